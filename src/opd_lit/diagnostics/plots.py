"""Matplotlib (Agg) drawings of the diagnostics tables. Each function takes the rows of one
table (as computed, or as read back from its CSV: cells may be strings) and a PNG path."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opd_lit.diagnostics.release_stats import release_summary  # noqa: E402
from opd_lit.diagnostics.tables import num  # noqa: E402

DPI = 100
# fixed margins instead of tight_layout (which draws every figure twice)
WIDE = {"left": 0.07, "right": 0.985, "bottom": 0.12, "top": 0.84, "wspace": 0.22}
GRID = {"left": 0.08, "right": 0.98, "bottom": 0.08, "top": 0.9, "wspace": 0.25, "hspace": 0.33}
SINGLE = {"left": 0.11, "right": 0.97, "bottom": 0.13, "top": 0.9}


def _save(fig, path: str | Path, margins: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.subplots_adjust(**margins)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _windows(rows: Sequence[dict]) -> list[int]:
    return sorted({int(num(r["step"])) for r in rows})


def _pick(windows: list[int], most: int = 6) -> list[int]:
    """First, last and evenly spaced windows in between (at most ``most``)."""
    if len(windows) <= most:
        return windows
    idx = sorted({round(i * (len(windows) - 1) / (most - 1)) for i in range(most)})
    return [windows[i] for i in idx]


def _window_label(rows: Sequence[dict]) -> str:
    r = rows[0]
    a, b = int(num(r["step_from"])), int(num(r["step"]))
    n = int(num(r["rollouts"]))
    return f"steps {a}-{b} ({n} rollouts)" if a != b else f"step {b} ({n} rollouts)"


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="#777", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _by_step(rows: Sequence[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        out[int(num(r["step"]))].append(r)
    return out


def _norm_label(rows: Sequence[dict], what: str) -> str:
    how = rows[0].get("normalize", "first_bin") if rows else "first_bin"
    return {
        "first_bin": f"{what} / {what} in the first bin", "mean": f"{what} / its mean over bins",
        "max": f"{what} / its max over bins", "none": f"{what} (not normalised)",
    }.get(how, f"{what}, normalised ({how})")


def _xs(rows: Sequence[dict]) -> list[float]:
    return [(num(r["bin_lo"]) + num(r["bin_hi"])) / 2 for r in rows]


# ---- Figure 1 ------------------------------------------------------------------------------


def draw_advantage(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Figure 1: (a) mean of A_t by relative position with a ±std band; (b) its std, normalised."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = _by_step(rows)
    windows = _pick(_windows(rows))
    cmap = plt.get_cmap("viridis")
    for i, w in enumerate(windows):
        g = sorted(groups[w], key=lambda r: int(num(r["bin"])))
        x = _xs(g)
        color = cmap(0.85 * i / max(1, len(windows) - 1))
        mean = [num(r["adv_mean"]) for r in g]
        std = [num(r["adv_std"]) for r in g]
        edge = i in (0, len(windows) - 1)
        ax_a.plot(x, mean, "-o", ms=3, color=color, lw=2 if edge else 1, label=_window_label(g))
        if edge:
            ax_a.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=color, alpha=0.15, lw=0)
        ax_b.plot(x, [num(r["adv_std_norm"]) for r in g], "-o", ms=3, color=color, lw=2 if edge else 1,
                  label=f"{_window_label(g)}: all tokens")
        ax_b.plot(x, [num(r["adv_std_within_norm"]) for r in g], "--", color=color, lw=1,
                  label=f"{_window_label(g)}: along each rollout" if edge else None)
    ax_a.axhline(0, color="#999", lw=0.8)
    ax_a.set(xlabel="relative position in the response", ylabel="A_t = log p_T - log p_S",
             title="(a) mean advantage per bin (band: ±1 std)", xlim=(0, 1))
    ax_b.axhline(1, color="#999", lw=0.8)
    ax_b.set(xlabel="relative position in the response", ylabel=_norm_label(rows, "std(A_t)"),
             title="(b) advantage dispersion, normalised", xlim=(0, 1))
    ax_a.legend(fontsize=7)
    ax_b.legend(fontsize=6)
    fig.suptitle(title or "Figure 1: advantage by position")
    return _save(fig, path, WIDE)


# ---- Figures 2 and 5 -----------------------------------------------------------------------


def draw_margins(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Figures 2/5: teacher top-1/top-2 margin within the student's top-K by position, per K."""
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups = _by_step(rows)
    windows = _windows(rows)
    last = groups[windows[-1]]
    by_k: dict[int, list[dict]] = defaultdict(list)
    for r in last:
        by_k[int(num(r["k"]))].append(r)
    cmap = plt.get_cmap("plasma")
    ks = sorted(by_k)
    for i, k in enumerate(ks):
        g = sorted(by_k[k], key=lambda r: int(num(r["bin"])))
        color = cmap(0.8 * i / max(1, len(ks) - 1))
        ax_a.plot(_xs(g), [num(r["margin_mean"]) for r in g], "-o", ms=3, color=color, label=f"K={k}")
        ax_b.plot(_xs(g), [num(r["margin_norm"]) for r in g], "-o", ms=3, color=color, label=f"K={k}")
    if len(windows) > 1 and ks:  # the first window at the largest K: how training moved the curve
        first = sorted((r for r in groups[windows[0]] if int(num(r["k"])) == ks[-1]), key=lambda r: int(num(r["bin"])))
        if first:
            ax_a.plot(_xs(first), [num(r["margin_mean"]) for r in first], ":", color="#555",
                      label=f"K={ks[-1]}, {_window_label(first)}")
    label = _window_label(last) if last else ""
    ax_a.set(xlabel="relative position in the response", ylabel="mean margin (log-prob)",
             title=f"(a) teacher top-1 minus top-2 margin, {label}", xlim=(0, 1))
    ax_b.axhline(1, color="#999", lw=0.8)
    ax_b.set(xlabel="relative position in the response", ylabel=_norm_label(rows, "margin"),
             title="(b) normalised margin, one curve per support size K", xlim=(0, 1))
    ax_a.legend(fontsize=7)
    ax_b.legend(fontsize=7)
    fig.suptitle(title or "Figures 2 and 5: teacher margin within the student's top-K")
    return _save(fig, path, WIDE)


# ---- Figure 3 ------------------------------------------------------------------------------


def draw_release(rows: Sequence[dict], path: str | Path, step: int | None = None, title: str = "") -> Path:
    """Figure 3: BIC gain, pre/post segment means, release positions, acceptance rate."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7.5))
    (ax_g, ax_p), (ax_r, ax_a) = axes
    groups = _by_step(rows)
    windows = _windows(rows)
    step = windows[-1] if step is None else int(step)
    cur = groups.get(step, [])
    acc = [r for r in cur if int(num(r["accepted"])) == 1]
    s = release_summary(cur) if cur else {}
    window = f"steps {int(num(cur[0]['step_from']))}-{step}" if cur else f"step {step}"
    if acc:
        gains = [num(r["bic_gain"]) for r in acc]
        ax_g.hist(gains, bins=min(30, max(5, len(gains) // 3)), color="#4c72b0")
        ax_g.axvline(s["bic_gain_mean"], color="k", ls="--", lw=1, label=f"mean {s['bic_gain_mean']:.2f}")
        ax_g.legend(fontsize=8)
        pre = [num(r["pre_mean"]) for r in acc]
        post = [num(r["post_mean"]) for r in acc]
        ax_p.scatter(pre, post, s=12, alpha=0.7, color="#c44e52")
        lo, hi = min(pre + post), max(pre + post)
        ax_p.plot([lo, hi], [lo, hi], color="#999", lw=1, label="post = pre")
        ax_p.legend(fontsize=8, title=f"mean pre {s['pre_mean']:.3f}, post {s['post_mean']:.3f}", title_fontsize=8)
        pos = [num(r["release_pos_frac"]) for r in acc]
        ax_r.hist(pos, bins=[i / 20 for i in range(21)], color="#55a868")
        ax_r.axvline(s["release_pos_frac_mean"], color="k", ls="--", lw=1,
                     label=f"mean {s['release_pos_frac_mean']:.2f}")
        ax_r.legend(fontsize=8)
        ax_r.set_xlim(0, 1)
    else:
        for ax in (ax_g, ax_p, ax_r):
            _empty(ax, "no accepted release in this window")
    not_acc = len(cur) - len(acc)
    ax_g.set(xlabel="BIC gain = BIC0 - BIC1 (accepted)", ylabel="rollouts",
             title=f"(a) BIC gain ({not_acc} of {len(cur)} not accepted: gain 0)")
    ax_p.set(xlabel="mean segment score before the release", ylabel="mean segment score after",
             title="(b) pre vs post segment score")
    ax_r.set(xlabel="release position / response length", ylabel="rollouts",
             title="(c) relative release position (accepted)")
    rates = []
    for w in windows:
        g = groups[w]
        if g:
            rates.append((w, sum(int(num(r["accepted"])) for r in g) / len(g)))
    if rates:
        ax_a.plot([w for w, _ in rates], [v for _, v in rates], "-o", color="#8172b2")
        ax_a.set_ylim(-0.02, 1.02)
        for w, v in rates[-1:]:
            ax_a.annotate(f"{100 * v:.0f}%", (w, v), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax_a.set(xlabel="training step (end of window)", ylabel="accepted / rollouts", title="(d) acceptance rate")
    head = title or "Figure 3: release statistics"
    if s:
        head += (f" - {window}: acceptance {100 * s['acceptance_rate']:.0f}% of {int(s['samples'])}"
                 f", mean release position {s['release_pos_frac_mean']:.2f}")
    fig.suptitle(head, fontsize=10)
    return _save(fig, path, GRID)


# ---- Figure 7 ------------------------------------------------------------------------------


def draw_fixed_prefix(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Figure 7: accuracy against kept fraction and diagnostic release position.

    Every run is a small point; fixed-prefix runs are grouped by their label (prefix length)
    into a mean point, joined in order of the x value; every other method gets its own marker
    and colour, with its mean over runs as a large marker.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    fixed = [r for r in rows if r["method"] == "fixed_prefix"]
    other_labels = sorted({r["label"] for r in rows if r["method"] != "fixed_prefix"})
    markers, colours = "*D^vPX", ["#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#937860"]
    for ax, key, xlabel in (
        (axes[0], "kept_frac", "kept-token fraction (mean over training)"),
        (axes[1], "release_pos_frac", "diagnostic release position / length (mean)"),
    ):
        def finite(rs, key=key):
            pts = [(num(r[key]), num(r["accuracy"])) for r in rs]
            return [p for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]

        groups: dict[str, list] = {}
        for r in fixed:
            groups.setdefault(r["label"], []).append(r)
        means = []
        for label, rs in groups.items():
            pts = finite(rs)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", ms=4, alpha=0.35, color="#4c72b0")
            mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
            means.append((mx, my, label, len(pts)))
        if means:
            means.sort()
            ax.plot([m[0] for m in means], [m[1] for m in means], "-o", color="#4c72b0",
                    label="fixed prefix (mean over runs)")
            for x, y, label, n in means:
                ax.annotate(f"{label} (n={n})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for i, label in enumerate(other_labels):
            pts = finite([r for r in rows if r["method"] != "fixed_prefix" and r["label"] == label])
            if not pts:
                continue
            m, c = markers[i % len(markers)], colours[i % len(colours)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], m, ms=6, alpha=0.4, color=c)
            ax.plot([sum(p[0] for p in pts) / len(pts)], [sum(p[1] for p in pts) / len(pts)], m, ms=13,
                    color=c, markeredgecolor="black", label=f"{label} (mean of {len(pts)})")
        if not ax.lines:
            _empty(ax, f"no run with both {key} and an accuracy")
        else:
            ax.legend(fontsize=8)
        ax.margins(x=0.12, y=0.12)
        ax.set(xlabel=xlabel, ylabel="final accuracy (mean over benchmarks)")
    axes[0].set_title("(a) accuracy vs kept tokens")
    axes[1].set_title("(b) accuracy vs where the release rule would release")
    fig.suptitle(title or "Figure 7: fixed prefix vs the release rule (small points: single runs)")
    return _save(fig, path, WIDE)


# ---- Figure 8 ------------------------------------------------------------------------------


def draw_response_length(rows: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Figure 8: mean response length over training steps, one bold line per method."""
    fig, ax = plt.subplots(figsize=(7.5, 4.3))
    by_method: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_method[r["label"] or r["method"]][r["run_id"]].append((int(num(r["step"])), num(r["response_len_mean"])))
    cmap = plt.get_cmap("tab10")
    for i, (method, runs) in enumerate(sorted(by_method.items())):
        color = cmap(i % 10)
        steps: dict[int, list[float]] = defaultdict(list)
        for series in runs.values():
            series.sort()
            if len(runs) > 1:
                ax.plot([s for s, _ in series], [v for _, v in series], color=color, alpha=0.25, lw=0.8)
            for s, v in series:
                steps[s].append(v)
        xs = sorted(steps)
        ax.plot(xs, [sum(steps[s]) / len(steps[s]) for s in xs], color=color, lw=2,
                label=f"{method} ({len(runs)} run{'s' if len(runs) > 1 else ''})")
    if not rows:
        _empty(ax, "no rollout/response_len_mean logged")
    else:
        ax.legend(fontsize=8)
    ax.set(xlabel="training step", ylabel="mean response length (tokens)")
    ax.set_title(title or "Figure 8: response length over training")
    return _save(fig, path, SINGLE)
