"""Tests of segmentation (opd_lit.release.segment) on a tiny byte-level BPE: the default
``structured`` segmenter (lines, sentences, display math) and the ``punkt`` option."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path

import nltk
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from opd_lit.release import (
    SEGMENTERS,
    ensure_punkt,
    release_weights_batch,
    segment_count_stats,
    segment_ids_batch,
    segment_starts,
    sentence_segments,
)
from opd_lit.release import segment as segment_mod

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello there. This is a test of the tokenizer! Is it working? Yes, it is.",
    "The answer is 42. We compute 3 + 4 = 7, then we check the result. 68.Next steps follow.",
    "Dr. Smith paid 5 dollars for a café au lait. Naïve résumé, façade, 5€ and 10%.",
    "First, add the numbers.\n\nSecond, divide by two: the total is 12.5 units. Done!",
    "Let $S = \\sum_{k=1}^{n} k^2$. Then\n$$\nS = \\frac{n(n+1)}{2}\n$$\n\\[ x \\] \\begin{align*} a \\end{align*}",
]
TEXTS = [
    "Hello there. This is a test! Is it working?  Yes.\n\nThe answer is 42.",
    "We compute 3 + 4 = 7. Then we check the result. 68.Next steps follow. Dr. Smith agrees.",
    "  Leading spaces. Café au lait costs 5€. Naïve résumé! Done",
    "So the total is 12.5 units.\nNext line without a period\n\nFinal answer: 17.",
    "Emoji are bytes too 🙂. A second sentence 😀 follows.",
]


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def hf_tokenizer(raw_tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )


@pytest.fixture(scope="module", params=["hf", "raw"])
def tokenizer(request, hf_tokenizer, raw_tokenizer):
    return hf_tokenizer if request.param == "hf" else raw_tokenizer


@pytest.fixture(scope="module", autouse=True)
def punkt_data():
    return ensure_punkt()


def encode(tok, text: str) -> list[int]:
    if isinstance(tok, Tokenizer):
        return tok.encode(text, add_special_tokens=False).ids
    return tok(text, add_special_tokens=False)["input_ids"]


def special_id(tok, name: str) -> int:
    return tok.token_to_id(name) if isinstance(tok, Tokenizer) else tok.convert_tokens_to_ids(name)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def assert_partition(segments: list[list[int]], n: int) -> None:
    """Every position exactly once, in order; segments non-empty and contiguous."""
    assert all(segments), segments
    assert [p for seg in segments for p in seg] == list(range(n))
    for seg in segments:
        assert seg == list(range(seg[0], seg[-1] + 1))


# ---------------------------------------------------------------------------
# coverage and sentence content
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_punkt_segments_partition_the_response_and_follow_nltk(tokenizer, text):
    ids = encode(tokenizer, text) + [special_id(tokenizer, "<|im_end|>")]
    segments = sentence_segments(tokenizer, ids, segmenter="punkt")
    assert_partition(segments, len(ids))
    sentences = nltk.sent_tokenize(text)
    assert len(segments) == len(sentences)
    for seg, sent in zip(segments, sentences):
        assert decode(tokenizer, [ids[p] for p in seg]).strip() == sent.strip()
    # the end-of-turn token joins the last sentence
    assert segments[-1][-1] == len(ids) - 1


# An eight-line step-by-step derivation with two display formulas (the case of issue 16):
# Punkt splits only after sentence-ending punctuation, so it sees 4 sentences here.
DERIVATION = r"""To find the sum, we first simplify.
Let $S = \sum_{k=1}^{n} k^2$. Then
$$
S = \frac{n(n+1)(2n+1)}{6}
$$
Substituting $n = 10$ gives
\[
S = \frac{10 \cdot 11 \cdot 21}{6} = 385
\]
so the sum is 385.
Therefore the answer is $\boxed{385}$."""
DERIVATION_SEGMENTS = [
    "To find the sum, we first simplify.",
    "Let $S = \\sum_{k=1}^{n} k^2$.",
    "Then",
    "$$\nS = \\frac{n(n+1)(2n+1)}{6}\n$$",
    "Substituting $n = 10$ gives",
    "\\[\nS = \\frac{10 \\cdot 11 \\cdot 21}{6} = 385\n\\]",
    "so the sum is 385.",
    "Therefore the answer is $\\boxed{385}$.",
]


def test_structured_default_splits_lines_sentences_and_display_math(tokenizer):
    ids = encode(tokenizer, DERIVATION) + [special_id(tokenizer, "<|im_end|>")]
    punkt = sentence_segments(tokenizer, ids, segmenter="punkt")
    default = sentence_segments(tokenizer, ids)
    assert default == sentence_segments(tokenizer, ids, segmenter="structured")
    for segments in (punkt, default):
        assert_partition(segments, len(ids))  # every token in exactly one segment
    assert len(punkt) == len(nltk.sent_tokenize(DERIVATION)) == 4
    got = [decode(tokenizer, [ids[p] for p in seg]).strip() for seg in default]
    assert got == DERIVATION_SEGMENTS
    assert segments[-1][-1] == len(ids) - 1  # the end-of-turn token joins the last segment


def test_structured_equals_punkt_on_single_lines_without_display_math(tokenizer):
    for text in (TEXTS[1], TEXTS[2], TEXTS[4], "First, 23 + 45 = 68. Next, 68 - 7 = 61. The answer is $\\boxed{61}$."):
        ids = encode(tokenizer, text)
        assert sentence_segments(tokenizer, ids) == sentence_segments(tokenizer, ids, segmenter="punkt")


@pytest.mark.parametrize(
    "text, segments",
    [
        # a display block is one segment even when Punkt or a line break would split inside it
        ("We get\n$$ a = 1. B = 2\n c = 3 $$ which is it.", ["We get", "$$ a = 1. B = 2\n c = 3 $$", "which is it."]),
        ("Sum: \\begin{align*} x &= 1 \\\\[2pt]\n y &= 2 \\end{align*} done.", ["Sum:", "\\begin{align*} x &= 1 \\\\[2pt]\n y &= 2 \\end{align*}", "done."]),
        ("So \\begin{equation} E = mc^2 \\end{equation}", ["So", "\\begin{equation} E = mc^2 \\end{equation}"]),
        # an unclosed $$ or a mismatched environment is text, not a block
        ("Cost is $$5 today\nand more.", ["Cost is $$5 today", "and more."]),
        ("A \\begin{align} x \\end{equation} b", ["A \\begin{align} x \\end{equation} b"]),
        # blank lines and trailing whitespace give no empty segment
        ("One\n\n\nTwo\n\n", ["One", "Two"]),
    ],
)
def test_structured_segments_of_display_blocks(text, segments):
    starts = segment_starts(text)
    pieces = [text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)])]
    assert pieces == segments


def test_unknown_segmenter_names_the_key(tokenizer):
    with pytest.raises(ValueError, match=r"release\.segmenter='lines': allowed is one of \['structured', 'punkt'\]"):
        sentence_segments(tokenizer, encode(tokenizer, "A. B."), segmenter="lines")
    with pytest.raises(ValueError, match=r"release\.segmenter="):
        segment_ids_batch(tokenizer, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2), segmenter="nltk")


def test_segment_count_stats_is_the_distribution_over_nonempty_responses():
    counts = [1, 2, 2, 3, 5, 8, 13, 0]  # the last response is empty
    t = 16
    seg = torch.full((len(counts), t), -1)
    for b, n in enumerate(counts):
        seg[b, :n] = torch.arange(n)  # one token per segment, then padding
    stats = segment_count_stats(seg)
    real = torch.tensor(counts[:-1], dtype=torch.float64)
    assert stats["release/segments_p50"] == 3.0
    assert stats["release/segments_p10"] == pytest.approx(float(torch.quantile(real, 0.1)))
    assert stats["release/segments_p90"] == pytest.approx(float(torch.quantile(real, 0.9)))
    assert stats["release/segments_max"] == 13.0
    assert stats["release/segments_le2_frac"] == pytest.approx(3 / 7)
    assert segment_count_stats(torch.full((2, 4), -1)) == {}
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        segment_count_stats(torch.zeros(4, dtype=torch.long))


def test_structured_segments_feed_the_batch_and_its_stats(hf_tokenizer):
    eot = special_id(hf_tokenizer, "<|im_end|>")
    rows = [encode(hf_tokenizer, DERIVATION) + [eot], encode(hf_tokenizer, TEXTS[0]) + [eot]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    structured = segment_ids_batch(hf_tokenizer, ids, mask)
    punkt = segment_ids_batch(hf_tokenizer, ids, mask, segmenter="punkt")
    n0 = len(nltk.sent_tokenize(TEXTS[0]))  # its line break follows a full stop: the same cut
    assert (structured.amax(1) + 1).tolist() == [8, n0] and (punkt.amax(1) + 1).tolist() == [4, n0]
    assert segment_count_stats(structured)["release/segments_max"] == 8.0
    assert segment_count_stats(punkt)["release/segments_max"] == float(max(4, n0))


@pytest.mark.parametrize("segmenter", SEGMENTERS)
@pytest.mark.parametrize("method", ["bytes", "incremental"])
@pytest.mark.parametrize("text", TEXTS)
def test_fallback_paths_match_offsets_path(tokenizer, text, method, segmenter):
    ids = encode(tokenizer, text) + [special_id(tokenizer, "<|im_end|>")]
    # "offsets" raises if re-encoding differs
    preferred = sentence_segments(tokenizer, ids, method="offsets", segmenter=segmenter)
    assert sentence_segments(tokenizer, ids, method=method, segmenter=segmenter) == preferred


def test_non_canonical_ids_fall_back(hf_tokenizer):
    text = "Hello there. This is a test! Is it working? Yes."
    # one token per character: valid ids, but not what encoding the text gives
    ids = [hf_tokenizer.convert_tokens_to_ids(c if c != " " else "\u0120") for c in text]
    assert ids != encode(hf_tokenizer, text)
    with pytest.raises(ValueError):
        sentence_segments(hf_tokenizer, ids, method="offsets")
    segments = sentence_segments(hf_tokenizer, ids)
    assert_partition(segments, len(ids))
    assert [
        decode(hf_tokenizer, [ids[p] for p in s]).strip() for s in segments
    ] == nltk.sent_tokenize(text)
    assert sentence_segments(hf_tokenizer, ids, method="incremental") == segments


def test_multibyte_character_split_across_tokens(raw_tokenizer):
    # byte tokens of "é" (0xC3 0xA9) given separately: the second one has no character of its own
    text = "Okay. \u00e9t\u00e9 is summer."
    byte_ids = []
    table = segment_mod._bytes_to_unicode()
    for byte in text.encode("utf-8"):
        byte_ids.append(raw_tokenizer.token_to_id(table[byte]))
    assert None not in byte_ids
    for method in ("auto", "bytes", "incremental"):
        segments = sentence_segments(raw_tokenizer, byte_ids, method=method)
        assert_partition(segments, len(byte_ids))
        assert len(segments) == 2
        assert (
            decode(raw_tokenizer, [byte_ids[p] for p in segments[1]]) == "\u00e9t\u00e9 is summer."
        )


def test_no_boundary_is_one_segment(tokenizer):
    for text in ("just some words without any end", "The value is 68.Next we add 5 and stop"):
        ids = encode(tokenizer, text)
        assert sentence_segments(tokenizer, ids) == [list(range(len(ids)))]


def test_number_dot_word_stays_one_sentence(tokenizer):
    ids = encode(tokenizer, "The value is 68.Next we add 5.")
    assert len(sentence_segments(tokenizer, ids)) == 1


def test_empty_and_special_only_responses(tokenizer):
    assert sentence_segments(tokenizer, []) == []
    eot, pad = special_id(tokenizer, "<|im_end|>"), special_id(tokenizer, "<|endoftext|>")
    assert sentence_segments(tokenizer, [eot]) == [[0]]
    assert sentence_segments(tokenizer, [eot, pad, pad]) == [[0, 1, 2]]


def test_special_tokens_join_the_previous_token(tokenizer):
    eot, start = special_id(tokenizer, "<|im_end|>"), special_id(tokenizer, "<|im_start|>")
    first, second = encode(tokenizer, "First one."), encode(tokenizer, " Second one.")
    ids = [start] + first + [eot] + second + [eot, eot]
    segments = sentence_segments(tokenizer, ids)
    assert_partition(segments, len(ids))
    assert len(segments) == 2
    # the leading special joins the first segment, the middle one the sentence it ends,
    # the trailing ones the last sentence
    assert segments[0][0] == 0 and len(first) + 1 in segments[0]
    assert segments[1][-1] == len(ids) - 1
    assert [decode(tokenizer, [ids[p] for p in s]).strip() for s in segments] == [
        "First one.",
        "Second one.",
    ]
    # a response given as a tensor works the same
    assert sentence_segments(tokenizer, torch.tensor(ids)) == segments


def test_random_texts_partition(tokenizer):
    rng = random.Random(3)
    words = [
        "the",
        "answer",
        "is",
        "42",
        "we",
        "compute",
        "then",
        "check",
        "result",
        "3.5",
        "café",
        "Dr.",
        "so",
        "next",
        "68.Next",
        "total",
    ]
    eot = special_id(tokenizer, "<|im_end|>")
    for _ in range(20):
        text = ""
        for _ in range(rng.randint(1, 6)):
            text += " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
            text += rng.choice([". ", "! ", "? ", "\n\n", ", ", ".", " "])
        ids = encode(tokenizer, text) + [eot] * rng.randint(0, 2)
        segments = sentence_segments(tokenizer, ids)
        assert_partition(segments, len(ids))
        assert segments == sentence_segments(tokenizer, ids, method="bytes")


# ---------------------------------------------------------------------------
# batch ids and the end-to-end release
# ---------------------------------------------------------------------------


def test_segment_ids_batch(hf_tokenizer):
    texts = TEXTS[:3]
    rows = [encode(hf_tokenizer, t) + [special_id(hf_tokenizer, "<|im_end|>")] for t in texts]
    width = max(len(r) for r in rows) + 3
    pad = special_id(hf_tokenizer, "<|endoftext|>")
    ids = torch.full((4, width), pad)
    mask = torch.zeros(4, width, dtype=torch.long)
    for i, r in enumerate(rows):
        off = 2 if i == 1 else 0  # one left-padded row
        ids[i, off : off + len(r)] = torch.tensor(r)
        mask[i, off : off + len(r)] = 1
    seg = segment_ids_batch(hf_tokenizer, ids, mask)  # row 3 is empty
    assert seg.dtype == torch.long and seg.shape == ids.shape
    assert torch.all(seg[mask == 0] == -1) and torch.all(seg[3] == -1)
    for i, r in enumerate(rows):
        got = seg[i][mask[i].bool()].tolist()
        want = [k for k, s in enumerate(sentence_segments(hf_tokenizer, r)) for _ in s]
        assert got == want

    # end to end: decisive first sentence, fading afterwards
    b, t = ids.shape[0], width
    margins = torch.where(seg == 0, 5.0, 0.05)
    lp = torch.stack(
        [torch.full((b, t), -0.01), -0.01 - margins, torch.full((b, t), -40.0)], dim=-1
    )
    out = release_weights_batch(torch.ones(b, t), mask.float(), lp, seg)
    assert out.accepted[:3].all() and out.release_segment[:3].tolist() == [1, 1, 1]
    torch.testing.assert_close(out.weight.sum(1), mask.float().sum(1))
    assert not torch.isnan(out.weight).any()


def test_16k_token_response_is_fast(hf_tokenizer):
    rng = random.Random(0)
    words = [
        "the",
        "answer",
        "is",
        "we",
        "compute",
        "then",
        "check",
        "result",
        "value",
        "sum",
        "of",
        "two",
        "numbers",
        "so",
        "next",
        "first",
    ]
    parts = []
    for _ in range(2500):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        parts.append(s[0].upper() + s[1:] + rng.choice([".", "!", "?", ":"]))
    ids = encode(hf_tokenizer, " ".join(parts))[:16383] + [special_id(hf_tokenizer, "<|im_end|>")]
    assert len(ids) == 16384
    start = time.perf_counter()
    segments = sentence_segments(hf_tokenizer, ids)
    elapsed = time.perf_counter() - start
    assert_partition(segments, len(ids))
    assert elapsed < 5.0, elapsed  # about 0.1 s on one idle core


# ---------------------------------------------------------------------------
# punkt data written offline
# ---------------------------------------------------------------------------


def test_punkt_tab_written_in_nltk_format(tmp_path, monkeypatch):
    from nltk.tokenize.punkt import PunktSentenceTokenizer, load_punkt_params

    monkeypatch.setattr(segment_mod, "_punkt_ready", False)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "elsewhere")])
    assert segment_mod._find_punkt() is None
    where = ensure_punkt(tmp_path / "nltk_data")  # not found on the path: must write
    assert where == tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in where.iterdir()) == sorted(segment_mod._PUNKT_FILES)
    assert str(tmp_path / "nltk_data") in nltk.data.path
    params = load_punkt_params(nltk.data.find(segment_mod.PUNKT_RESOURCE))
    assert {"dr", "mr", "u.s", "p.m"} <= params.abbrev_types
    assert len(params.ortho_context) > 1000 and params.collocations and params.sent_starters
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left. The U.S. is large."
    assert PunktSentenceTokenizer(params).tokenize(text) == nltk.sent_tokenize(text)
    # already there: returns at once without writing
    assert ensure_punkt(tmp_path / "other") == where
    assert not (tmp_path / "other").exists()


def test_cli_install_punkt(tmp_path):
    src = str(Path(segment_mod.__file__).resolve().parents[2])
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::RuntimeWarning",
            "-m",
            "opd_lit.release.segment",
            "--install-punkt",
        ],
        check=False,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "punkt_tab" in proc.stdout and "english" in proc.stdout


def test_every_public_name_of_the_package_resolves():
    import opd_lit.release as release

    for name in release.__all__:
        assert getattr(release, name) is not None, name
    assert release.SEGMENTERS[0] == release.DEFAULT_SEGMENTER == "structured"
