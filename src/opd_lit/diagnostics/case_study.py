"""Release case studies (Figure 6, appendix A.4): one self-contained HTML page per rollout.

The page shows the response text with every token coloured by what the release rule did with
it (blue: kept, i.e. supervised; red: released), sentence segments in alternating shades, and
beneath it a plot (inline base64 PNG) of the segment scores ``S_i = log1p(mean margin)`` with the chosen
change point and the pre/post means. Everything the page shows comes from one table (one row
per token, :func:`case_study_rows`), which is logged as CSV beside the page, so the page can
be re-drawn (:func:`render_case_study_html`) without the tokenizer or the models.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

from torch import Tensor

TOKEN_COLUMNS = (
    "step", "sample", "pos", "text", "segment", "segment_score", "kept", "margin", "advantage",
    "accepted", "bic_gain", "release_segment", "release_token", "pre_mean", "post_mean",
)


def case_priority(release, lengths: Tensor, i: int) -> tuple:
    """Sort key of row ``i`` as a case study (larger first): accepted releases, those over 3+
    segments (with 2 segments any drop beats the no-change model: RSS1 = 0), BIC gain, length."""
    return (bool(release.accepted[i]), int(release.num_segments[i]) >= 3,
            float(release.bic_gain[i]), int(lengths[i]))


def select_case_studies(release, mask: Tensor, n: int) -> list[int]:
    """Rows to show, best first by :func:`case_priority`: accepted releases by decreasing BIC
    gain (3+ segments first), then the longest of the others.

    ``release``: BatchRelease, ``mask [B, T]`` -> up to ``n`` row indices of non-empty responses.
    """
    if n <= 0:
        return []
    lengths = (mask > 0).sum(-1).cpu()
    rows = [i for i in range(int(lengths.shape[0])) if int(lengths[i]) > 0]
    rows.sort(key=lambda i: (case_priority(release, lengths, i), -i), reverse=True)
    return rows[:n]


def token_pieces(decode: Callable[[list[int]], str], ids: Sequence[int], window: int = 8) -> list[str]:
    """The text each token adds, by decoding a short window before and after it.

    ``decode`` maps ids to text (e.g. ``lambda x: tok.decode(x, skip_special_tokens=False)``).
    A window, not the whole prefix, keeps this linear in the response length; multi-byte
    characters split over tokens come out on the token that completes them.
    """
    ids = [int(i) for i in ids]
    pieces = []
    for i in range(len(ids)):
        lo = max(0, i - window)
        before = decode(ids[lo:i]) if i > lo else ""
        upto = decode(ids[lo : i + 1])
        j = 0
        while j < min(len(before), len(upto)) and before[j] == upto[j]:
            j += 1
        piece = upto[j:]
        pieces.append(piece.replace("\ufffd", "") if "\ufffd" in piece and i + 1 < len(ids) else piece)
    return pieces


def case_study_rows(
    pieces: Sequence[str],
    keep_mask: Tensor,  # [T] 1 = kept by the release rule
    segment_ids: Tensor,  # [T] segment of each token
    segment_scores: Tensor,  # [S] S_i (NaN past the last segment)
    margin: Tensor,  # [T] teacher top-1/top-2 margin
    advantage: Tensor,  # [T] A_t
    *,
    step: int,
    sample: int,
    accepted: bool,
    bic_gain: float,
    release_segment: int,
    release_token: int,
    pre_mean: float,
    post_mean: float,
) -> list[dict]:
    """One row per response token (``len(pieces)`` tokens; tensors may be longer: padding)."""
    scores = segment_scores.detach().cpu().double()
    seg = segment_ids.detach().cpu().long()
    rows = []
    for t, text in enumerate(pieces):
        s = int(seg[t])
        rows.append({
            "step": step, "sample": sample, "pos": t, "text": text, "segment": s,
            "segment_score": float(scores[s]) if 0 <= s < scores.shape[0] else math.nan,
            "kept": int(float(keep_mask[t]) > 0), "margin": float(margin[t]),
            "advantage": float(advantage[t]), "accepted": int(bool(accepted)),
            "bic_gain": float(bic_gain), "release_segment": int(release_segment),
            "release_token": int(release_token),
            "pre_mean": float(pre_mean) if accepted else math.nan,
            "post_mean": float(post_mean) if accepted else math.nan,
        })
    return rows


# ---- rendering ---------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
.meta { color: #444; } .legend span { padding: 0 .4em; margin-right: .6em; }
.text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.92em;
        line-height: 1.7; border: 1px solid #ddd; padding: .8em; border-radius: 4px; }
.k0 { background: #d6e6fb; } .k1 { background: #b9d3f5; }
.r0 { background: #fbd9d6; } .r1 { background: #f5bcb7; }
.cut { border-left: 3px solid #b00; }
table { border-collapse: collapse; font-size: .85em; margin-top: .6em; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
td.k { background: #d6e6fb; } td.r { background: #fbd9d6; }
"""


def _f(x, fmt: str = ".3f") -> str:
    v = float(x)
    return "n/a" if not math.isfinite(v) else format(v, fmt)


def _segments(rows: Sequence[dict]) -> list[dict]:
    """Per-segment summary of token rows: index, tokens, score, kept."""
    segs: dict[int, dict] = {}
    for r in rows:
        s = int(float(r["segment"]))
        if s < 0:
            continue
        d = segs.setdefault(s, {"segment": s, "tokens": 0, "score": float(r["segment_score"]), "kept": 0})
        d["tokens"] += 1
        d["kept"] = max(d["kept"], int(float(r["kept"])))
    return [segs[k] for k in sorted(segs)]


def segment_score_png(segs: Sequence[dict], release_segment: int, accepted: bool,
                      pre_mean: float, post_mean: float) -> bytes:
    """PNG bytes: segment scores, the chosen change point and the pre/post means (matplotlib)."""
    import io

    from opd_lit.diagnostics.plots import plt

    fig, ax = plt.subplots(figsize=(8, 2.8))
    xs = [s["segment"] for s in segs]
    ys = [s["score"] for s in segs]
    ax.plot(xs, ys, "-", color="#777", lw=1)
    ax.scatter(xs, ys, s=22, zorder=3, c=["#1f5fbf" if s["kept"] else "#c0392b" for s in segs])
    n = len(segs)
    if accepted and 0 < release_segment < n:
        cut = release_segment - 0.5
        ax.axvline(cut, color="#b00", ls="--", lw=1.2, label=f"release: tau = {release_segment}")
        if math.isfinite(pre_mean):
            ax.hlines(pre_mean, -0.5, cut, color="#1f5fbf", lw=2, alpha=0.6, label=f"pre mean {pre_mean:.3f}")
        if math.isfinite(post_mean):
            ax.hlines(post_mean, cut, n - 0.5, color="#c0392b", lw=2, alpha=0.6, label=f"post mean {post_mean:.3f}")
        ax.legend(fontsize=8, loc="best")
    ax.set(xlabel="sentence segment i", ylabel="S_i = log1p(mean margin)", xlim=(-0.5, max(n, 1) - 0.5))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.17, top=0.96)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def render_case_study_html(rows: Sequence[dict], title: str | None = None) -> str:
    """The page for one rollout from its token rows (values may be strings, as read from CSV)."""
    if not rows:
        raise ValueError("a case study needs at least one token row")
    r0 = rows[0]
    step, sample = int(float(r0["step"])), int(float(r0["sample"]))
    accepted = bool(int(float(r0["accepted"])))
    release_segment = int(float(r0["release_segment"]))
    release_token = int(float(r0["release_token"]))
    pre, post = float(r0["pre_mean"]), float(r0["post_mean"])
    n_tok = len(rows)
    segs = _segments(rows)
    title = title or f"Release case study: step {step}, rollout {sample}"
    if accepted:
        decision = (f"release accepted: BIC gain {_f(r0['bic_gain'])}; supervision stops at segment "
                    f"{release_segment} of {len(segs)} (token {release_token} of {n_tok}, "
                    f"{100 * release_token / max(1, n_tok):.0f}% of the response); mean segment score "
                    f"{_f(pre)} before, {_f(post)} after")
    else:
        decision = (f"no release accepted (no downward change point beats the no-change model): "
                    f"all {n_tok} tokens over {len(segs)} segments stay supervised (full OPD)")
    spans = []
    for r in rows:
        seg = int(float(r["segment"]))
        kept = int(float(r["kept"]))
        cls = ("k" if kept else "r") + str(seg % 2 if seg >= 0 else 0)
        if accepted and int(float(r["pos"])) == release_token:
            cls += " cut"  # a bar where supervision stops
        tip = (f"t={int(float(r['pos']))} · segment {seg} · S={_f(r['segment_score'])} · "
               f"margin={_f(r['margin'])} · A={_f(r['advantage'])}")
        spans.append(f'<span class="{cls}" title="{html.escape(tip)}">{html.escape(str(r["text"]))}</span>')
    table = ["<table><tr><th>segment</th><th>tokens</th><th>S_i</th><th></th></tr>"]
    for s in segs:
        c = "k" if s["kept"] else "r"
        table.append(f'<tr><td>{s["segment"]}</td><td>{s["tokens"]}</td><td>{_f(s["score"])}</td>'
                     f'<td class="{c}">{"kept" if s["kept"] else "released"}</td></tr>')
    table.append("</table>")
    import base64

    png = base64.b64encode(segment_score_png(segs, release_segment, accepted, pre, post)).decode("ascii")
    img = f'<img alt="segment scores" src="data:image/png;base64,{png}">' 
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(decision)}</p>',
        '<p class="legend"><span class="k0">kept (supervised)</span><span class="r0">released</span>'
        " alternating shades mark sentence segments; hover a token for its numbers</p>",
        f'<div class="text">{"".join(spans)}</div>',
        "<h2>Segment scores and the chosen change point</h2>", img, "".join(table),
        "</body></html>",
    ])


def response_margin(teacher_topk_logprobs: Tensor | None, top_k: int) -> Tensor | None:
    """``[B, T, K]`` -> ``[B, T]`` margin over the first ``top_k`` candidates (None if absent)."""
    if teacher_topk_logprobs is None or teacher_topk_logprobs.shape[-1] < 2:
        return None
    from opd_lit.release import teacher_margin

    return teacher_margin(teacher_topk_logprobs[..., : max(2, min(top_k, teacher_topk_logprobs.shape[-1]))])


__all__ = [
    "TOKEN_COLUMNS", "case_priority", "case_study_rows", "render_case_study_html", "response_margin",
    "segment_score_png", "select_case_studies", "token_pieces",
]
