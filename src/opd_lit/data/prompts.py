"""Prompt datasets: the embedded toy task, or any local JSONL / parquet file of prompts.

Every source yields records ``{"id", "messages", "answer"}``: ``messages`` is the chat
conversation to render with each model's own template, ``answer`` the reference final answer
(``None`` when the data has none). Real data (DeepMath-103K, ...) is read from a local copy
through ``datasets``: there is no hub access at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCES = ("toy", "file")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataConfigError(ValueError):
    """A data setting that cannot be used, naming the key."""


@dataclass
class PromptSpec:
    """How to turn a row of a local file into a prompt record (``data.*`` config keys)."""

    source: str = "toy"
    path: str | None = None  # file or directory of files (source=file)
    split: str = "train"
    prompt_field: str = "question"
    answer_field: str | None = "final_answer"
    id_field: str | None = None
    system_prompt: str | None = None
    # {prompt} is replaced by the row's prompt text
    prompt_template: str = "{prompt}"
    # keep rows whose difficulty_field is >= min_difficulty (null: every row); DeepMath-103K's
    # column is "difficulty"
    min_difficulty: float | None = None
    difficulty_field: str = "difficulty"
    limit: int | None = None
    num_train: int = 4096  # toy: how many training problems to generate
    seed: int = 0


def toy_records(n: int) -> list[dict[str, Any]]:
    from opd_lit.toy import toy_train_problems
    from opd_lit.toy.task import format_prompt

    return [
        {"id": p["id"], "messages": format_prompt(p), "answer": p["answer"]}
        for p in toy_train_problems(n)
    ]


def _data_files(path: str) -> tuple[str, list[str]]:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataConfigError(f"data.path={path!r}: no such file or directory")
    files = sorted(f for f in p.rglob("*") if f.suffix in FILE_FORMATS) if p.is_dir() else [p]
    if not files:
        raise DataConfigError(
            f"data.path={path!r}: no data files found (allowed: {sorted(FILE_FORMATS)})"
        )
    kinds = {FILE_FORMATS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataConfigError(
            f"data.path={path!r}: files must all be one of {sorted(FILE_FORMATS)}, got "
            f"{sorted({f.suffix for f in files})}"
        )
    return kinds.pop(), [str(f) for f in files]


def file_records(spec: PromptSpec) -> list[dict[str, Any]]:
    import datasets

    if not spec.path:
        raise DataConfigError("data.path is required when data.source=file")
    builder, files = _data_files(spec.path)
    ds = datasets.load_dataset(builder, data_files=files, split="train")
    columns = set(ds.column_names)
    for key in ("prompt_field", "answer_field", "id_field"):
        name = getattr(spec, key)
        if name is not None and name not in columns:
            raise DataConfigError(
                f"data.{key}={name!r} is not a column of {spec.path}; columns: {sorted(columns)}"
            )
    if spec.min_difficulty is not None:
        ds = _at_least_difficulty(ds, spec)
    if spec.limit is not None:
        ds = ds.select(range(min(spec.limit, len(ds))))
    records = []
    for i, row in enumerate(ds):
        text = spec.prompt_template.format(prompt=row[spec.prompt_field])
        messages = [{"role": "user", "content": text}]
        if spec.system_prompt:
            messages.insert(0, {"role": "system", "content": spec.system_prompt})
        records.append(
            {
                "id": str(row[spec.id_field]) if spec.id_field else f"{Path(spec.path).stem}-{i}",
                "messages": messages,
                "answer": None if spec.answer_field is None else str(row[spec.answer_field]),
            }
        )
    return records


def _at_least_difficulty(ds, spec: PromptSpec):
    """The rows with ``difficulty_field >= min_difficulty`` (a missing column is an error)."""
    key, low = spec.difficulty_field, spec.min_difficulty
    if isinstance(low, bool) or not isinstance(low, (int, float)):
        raise DataConfigError(f"data.min_difficulty={low!r}: allowed is null (every row) or a number")
    if key not in ds.column_names:
        raise DataConfigError(
            f"data.min_difficulty={low!r} needs data.difficulty_field={key!r}, which is not a "
            f"column of {spec.path}; columns: {sorted(ds.column_names)}"
        )
    kept = ds.filter(lambda v: v is not None and float(v) >= low, input_columns=key)
    if len(kept) == 0:
        raise DataConfigError(
            f"data.min_difficulty={low!r}: no row of {spec.path} has {key} >= {low}"
        )
    return kept


def load_prompt_records(spec: PromptSpec) -> list[dict[str, Any]]:
    if spec.source == "toy":
        records = toy_records(spec.num_train)
    elif spec.source == "file":
        records = file_records(spec)
    else:
        raise DataConfigError(f"data.source={spec.source!r} is not one of {list(SOURCES)}")
    if not records:
        raise DataConfigError(f"data: the {spec.source} source gave no prompts")
    return records
