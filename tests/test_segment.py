"""Tests of sentence segmentation (opd_lit.release.segment) on a tiny byte-level BPE."""

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
    ensure_punkt,
    release_weights_batch,
    segment_ids_batch,
    sentence_segments,
)
from opd_lit.release import segment as segment_mod

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello there. This is a test of the tokenizer! Is it working? Yes, it is.",
    "The answer is 42. We compute 3 + 4 = 7, then we check the result. 68.Next steps follow.",
    "Dr. Smith paid 5 dollars for a café au lait. Naïve résumé, façade, 5€ and 10%.",
    "First, add the numbers.\n\nSecond, divide by two: the total is 12.5 units. Done!",
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
def test_segments_partition_the_response_and_follow_nltk(tokenizer, text):
    ids = encode(tokenizer, text) + [special_id(tokenizer, "<|im_end|>")]
    segments = sentence_segments(tokenizer, ids)
    assert_partition(segments, len(ids))
    sentences = nltk.sent_tokenize(text)
    assert len(segments) == len(sentences)
    for seg, sent in zip(segments, sentences):
        assert decode(tokenizer, [ids[p] for p in seg]).strip() == sent.strip()
    # the end-of-turn token joins the last sentence
    assert segments[-1][-1] == len(ids) - 1


@pytest.mark.parametrize("method", ["bytes", "incremental"])
@pytest.mark.parametrize("text", TEXTS)
def test_fallback_paths_match_offsets_path(tokenizer, text, method):
    ids = encode(tokenizer, text) + [special_id(tokenizer, "<|im_end|>")]
    preferred = sentence_segments(tokenizer, ids, method="offsets")  # raises if re-encoding differs
    assert sentence_segments(tokenizer, ids, method=method) == preferred


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
