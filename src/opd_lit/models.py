"""Loading students, teachers and reference models from local Hugging Face directories.

``path`` is any local directory holding ``config.json`` and weights (no hub downloads), or
``toy:teacher`` / ``toy:student`` for the embedded toy pair, which is verified against its
content hash and rebuilt into the cache if it does not match (see :mod:`opd_lit.toy`).
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOY_PREFIX = "toy:"


class ModelPathError(FileNotFoundError):
    """A model path that does not point at a local Hugging Face model directory."""


def resolve_model_path(path: str | Path, key: str = "path") -> Path:
    """The local directory behind ``path``; ``toy:<role>`` builds or verifies the toy model."""
    text = str(path)
    if text.startswith(TOY_PREFIX):
        from opd_lit.toy import toy_model_dir

        return toy_model_dir(text[len(TOY_PREFIX):])
    p = Path(text).expanduser()
    if not p.exists():
        raise ModelPathError(
            f"{key}={text!r}: no such directory. Give a local Hugging Face model directory "
            f"(with config.json and weights) or one of toy:teacher, toy:student."
        )
    if not (p / "config.json").is_file():
        raise ModelPathError(
            f"{key}={text!r}: {p} has no config.json, so it is not a Hugging Face model directory."
        )
    return p


def load_tokenizer(path: str | Path, key: str = "path") -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve_model_path(path, key))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device: str | torch.device | None = None,
    key: str = "path",
) -> torch.nn.Module:
    if dtype not in DTYPES:
        raise ValueError(f"{key}: dtype={dtype!r} is not one of {sorted(DTYPES)}")
    local = resolve_model_path(path, key)
    model = AutoModelForCausalLM.from_pretrained(
        local, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )
    if device is not None:
        model = model.to(device)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, model_path: str | Path | None = None) -> list[int]:
    """Token ids that end a response: the generation config's eos ids, else the tokenizer's eos."""
    ids: list[int] = []
    if model_path is not None:
        try:
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(resolve_model_path(model_path))
            eos = gen.eos_token_id
            ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        except OSError:
            ids = []
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


@dataclass
class VocabReport:
    student_size: int
    teacher_size: int


def check_same_vocabulary(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    student_model: torch.nn.Module | None = None,
    teacher_model: torch.nn.Module | None = None,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> VocabReport:
    """Teacher and student must index the same vocabulary: response ids are scored by both."""
    s_len, t_len = len(student_tok), len(teacher_tok)
    if s_len != t_len or student_tok.get_vocab() != teacher_tok.get_vocab():
        raise ValueError(
            f"teacher and student tokenizers differ: {student_name} has {s_len} tokens, "
            f"{teacher_name} has {t_len} tokens"
            + ("" if s_len != t_len else " (same size, different token-to-id mapping)")
            + ". On-policy distillation scores the student's token ids with the teacher, "
            "so both must share one vocabulary."
        )
    if student_model is not None and teacher_model is not None:
        s_rows = student_model.get_output_embeddings().weight.shape[0]
        t_rows = teacher_model.get_output_embeddings().weight.shape[0]
        if s_rows != t_rows:
            raise ValueError(
                f"teacher and student output layers differ: {student_name} has {s_rows} rows, "
                f"{teacher_name} has {t_rows} rows (tokenizers have {s_len} tokens)"
            )
    return VocabReport(student_size=s_len, teacher_size=t_len)


SAMPLE_CONVERSATION = [{"role": "user", "content": "What is 2 + 3? Put the answer in \\boxed{}."}]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of ``messages`` in ``tokenizer``'s chat template, ready for the assistant turn."""
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, **template_kwargs
    )
    ids = out["input_ids"] if hasattr(out, "keys") else out
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    return list(ids)


def template_difference(
    student_tok: PreTrainedTokenizerBase,
    teacher_tok: PreTrainedTokenizerBase,
    messages: list[dict] | None = None,
    student_kwargs: dict | None = None,
    teacher_kwargs: dict | None = None,
) -> str:
    """A short report of how the two chat templates render the same conversation."""
    messages = messages or SAMPLE_CONVERSATION
    s_text = student_tok.decode(render_prompt(student_tok, messages, **(student_kwargs or {})))
    t_text = teacher_tok.decode(render_prompt(teacher_tok, messages, **(teacher_kwargs or {})))
    if s_text == t_text:
        return "teacher and student chat templates render the sample conversation identically"
    diff = difflib.unified_diff(
        s_text.splitlines(), t_text.splitlines(), "student", "teacher", lineterm="", n=1
    )
    return "teacher and student chat templates differ on a sample conversation:\n" + "\n".join(diff)
