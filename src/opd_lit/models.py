"""Loading students, teachers and reference models from local Hugging Face directories.

``path`` is any local directory holding ``config.json`` and weights (no hub downloads), or
``toy:teacher`` / ``toy:student`` for the embedded toy pair, which is verified against its
content hash and rebuilt into the cache if it does not match (see :mod:`opd_lit.toy`).

:func:`model_dir_problems` checks a directory's files before anything loads (the
``model_files`` check of :mod:`opd_lit.validate`): ``config.json`` parses, the weights are
there and readable (every safetensors header parses and the file is as long as its header
says: a truncated download is named with its path), and the tensor shapes agree with
``config.json`` (embedding rows and width, number of layers).
"""

from __future__ import annotations

import difflib
import json
import logging
import re
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


# ---- files of a model directory, checked before anything loads ----------------------------

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER = 100 << 20
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def safetensors_header(path: Path) -> dict:
    """The tensor table of a ``.safetensors`` file, checked against the file's length.

    Reads the 8-byte header length and the JSON header only. Raises ``ValueError`` naming the
    path when the file is shorter than its header says (truncated) or the header is not valid.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: header of {n} bytes in a file of {size} bytes (truncated or not safetensors)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, t in tensors.items():
        try:
            start, stop = (int(x) for x in t["data_offsets"])
            shape = [int(d) for d in t["shape"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has no valid shape / data_offsets in the header") from None
        width = _ST_BYTES.get(t.get("dtype"))
        if width is not None and (stop - start) != width * _prod(shape):
            raise ValueError(f"{path}: tensor {name!r} {t.get('dtype')}{shape} spans {stop - start} bytes (corrupted header)")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ValueError(
            f"{path}: truncated: {size} bytes, its header describes {8 + n + end} "
            "(an interrupted download or copy? copy the file again)"
        )
    return tensors


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _weight_tables(d: Path) -> tuple[dict[str, list[int]], list[str]]:
    """``{tensor: shape}`` from the safetensors headers, and the problems found on the way."""
    shapes: dict[str, list[int]] = {}
    problems: list[str] = []
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return shapes, [f"{index}: not a readable weight index ({type(e).__name__}: {e})"]
        for shard in sorted(set(weight_map.values())):
            f = d / shard
            if not f.is_file():
                problems.append(f"{f}: missing (listed in {index.name})")
                continue
            try:
                table = safetensors_header(f)
            except (OSError, ValueError) as e:
                problems.append(str(e))
                continue
            lacking = [k for k, v in weight_map.items() if v == shard and k not in table]
            if lacking:
                problems.append(f"{f}: lacks {len(lacking)} tensor(s) {index.name} puts there, e.g. {lacking[0]!r}")
            shapes.update({k: v["shape"] for k, v in table.items()})
        return shapes, problems
    single = d / "model.safetensors"
    if single.is_file():
        try:
            shapes = {k: v["shape"] for k, v in safetensors_header(single).items()}
        except (OSError, ValueError) as e:
            problems.append(str(e))
        return shapes, problems
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (d / name).is_file():
            if name.endswith(".bin"):
                import zipfile

                try:  # torch.save files are zip archives: the central directory sits at the end
                    zipfile.ZipFile(d / name).namelist()
                except (OSError, zipfile.BadZipFile) as e:
                    problems.append(f"{d / name}: unreadable ({e}; truncated?)")
            return shapes, problems
    return shapes, [f"{d}: no weights (one of {', '.join(WEIGHT_FILES)})"]


def model_dir_problems(path: str | Path) -> list[str]:
    """What is wrong with the files of a local model directory (empty when nothing), by path."""
    d = Path(path).expanduser()
    config_path = d / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        return [f"{config_path}: not readable JSON ({type(e).__name__}: {e})"]
    if not isinstance(config, dict):
        return [f"{config_path}: not a JSON object"]
    shapes, problems = _weight_tables(d)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vocab, hidden, layers = text.get("vocab_size"), text.get("hidden_size"), text.get("num_hidden_layers")
    for name, shape in shapes.items():
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")) and len(shape) == 2:
            expected = [vocab, hidden]
            if None not in expected and shape != expected:
                problems.append(
                    f"{d}: tensor {name} is {shape}, config.json says [vocab_size, hidden_size] = {expected}"
                )
            break
    found = {int(m.group(1)) for name in shapes for m in [_LAYER.search(name)] if m}
    if found and isinstance(layers, int) and max(found) + 1 != layers:
        problems.append(f"{d}: the weights hold {max(found) + 1} layers, config.json says num_hidden_layers={layers}")
    return problems


def attention_head_dim(path: str | Path) -> int | None:
    """``head_dim`` of the model in ``path`` from its ``config.json`` (None if it cannot tell)."""
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    if isinstance(text.get("head_dim"), int):
        return text["head_dim"]
    hidden, heads = text.get("hidden_size"), text.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None
