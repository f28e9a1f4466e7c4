"""Prompt datasets: the embedded toy task, or any local JSONL / parquet file of prompts.

Every source yields records ``{"id", "messages", "answer"}``: ``messages`` is the chat
conversation to render with each model's own template, ``answer`` the reference final answer
(``None`` when the data has none). Real data (DeepMath-103K, ...) is read from a local copy
through ``datasets``: there is no hub access at run time.

Rows are checked before any model loads (:func:`scan_prompt_files`, the ``prompt_rows``
check of :mod:`opd_lit.validate`): every row of every file is parsed, and each problem is
named by file and line (row, for parquet): a file that is empty, a line that is not UTF-8 or
not a JSON object, a prompt that is missing, null, not text or blank, a null answer or id,
a ``data.prompt_template`` field the row lacks. :func:`row_problem` is the one rule for a
row; :func:`render_template` fills the template (``{prompt}`` is the row's
``data.prompt_field``, ``{name}`` any other field of the row, ``{{``/``}}`` literal braces;
every other brace is kept as written, so ``\\boxed{}`` needs no escaping).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    check_wording: str = "free"  # toy: free (low-contrast check lines) | fixed (mechanism off)
    seed: int = 0


def toy_records(n: int, wording: str = "free") -> list[dict[str, Any]]:
    from opd_lit.toy import toy_train_problems
    from opd_lit.toy.task import format_prompt

    return [
        {"id": p["id"], "messages": format_prompt(p), "answer": p["answer"]}
        for p in toy_train_problems(n, wording=wording)
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
        problem = row_problem(row, spec)
        if problem:  # validation names file and line; this guards direct use
            raise DataConfigError(f"data.path={spec.path!r}: row {i}: {problem}")
        text = render_template(spec.prompt_template, {**row, "prompt": row[spec.prompt_field]})
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
        records = toy_records(spec.num_train, spec.check_wording)
    elif spec.source == "file":
        records = file_records(spec)
    else:
        raise DataConfigError(f"data.source={spec.source!r} is not one of {list(SOURCES)}")
    if not records:
        raise DataConfigError(f"data: the {spec.source} source gave no prompts")
    return records


# ---- row checks (before any model loads) ----------------------------------------------------

_TEMPLATE = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_LISTED = 5  # problems listed per file; the rest are counted


def template_fields(template: str) -> list[str]:
    """The ``{name}`` fields of a prompt template, in order, without repeats."""
    out: list[str] = []
    for m in _TEMPLATE.finditer(template):
        if m.group(1) and m.group(1) not in out:
            out.append(m.group(1))
    return out


def render_template(template: str, values: dict[str, Any]) -> str:
    """Fill ``{name}`` from ``values``; ``{{`` / ``}}`` are literal braces, other braces stay."""

    def fill(m: re.Match) -> str:
        if m.group(1) is None:
            return m.group(0)[0]
        return str(values[m.group(1)])

    return _TEMPLATE.sub(fill, template)


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def row_problem(row: dict[str, Any], spec: PromptSpec) -> str | None:
    """What is wrong with one row (None when it can be used)."""
    key = spec.prompt_field
    if key not in row:
        return f"no field {key!r} (data.prompt_field); the row has {sorted(row)}"
    prompt = row[key]
    if prompt is None:
        return f"{key!r} is null"
    if not isinstance(prompt, str):
        return f"{key!r} is {type(prompt).__name__}, not text"
    if not prompt.strip():
        return f"{key!r} is empty"
    for setting, name in (("data.answer_field", spec.answer_field), ("data.id_field", spec.id_field)):
        if name is None:
            continue
        if name not in row:
            return f"no field {name!r} ({setting}; {setting}=null if the data has none); the row has {sorted(row)}"
        if row[name] is None or _blank(row[name]):
            return f"{name!r} ({setting}) is {'null' if row[name] is None else 'empty'}"
    for name in template_fields(spec.prompt_template):
        if name == "prompt":
            continue
        if name not in row or row[name] is None:
            return f"data.prompt_template uses {{{name}}}, which the row {'has as null' if name in row else 'lacks'}"
    return None


def _utf8(raw: bytes) -> tuple[str | None, int, str | None]:
    """``(text, 0, None)``, or ``(None, lines before the bad byte, why)``."""
    try:
        return raw.decode("utf-8"), 0, None
    except UnicodeDecodeError as e:
        before = raw[: e.start]
        column = e.start - (before.rfind(b"\n") + 1) + 1
        why = f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); save the file as UTF-8"
        return None, before.count(b"\n"), why


def _json_lines(data: bytes) -> Iterator[tuple[int, dict | None, str | None]]:
    for n, raw in enumerate(data.splitlines(), 1):
        text, _, err = _utf8(raw)
        if err:
            yield n, None, err
            continue
        if n == 1:
            text = text.lstrip("\ufeff")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except ValueError as e:
            yield n, None, f"not valid JSON ({getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')})"
            continue
        if not isinstance(obj, dict):
            yield n, None, f"a JSON object per line, got {type(obj).__name__}"
            continue
        yield n, obj, None


def iter_file_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict | None, str | None]]:
    """``(line, row, None)`` for each row of a prompt file, ``(line, None, why)`` for a bad one.

    ``columns``: the fields the rows need (parquet reads only those).
    """
    suffix = path.suffix
    if suffix == ".parquet":
        yield from _parquet_rows(path, columns)
        return
    data = path.read_bytes()
    if suffix == ".json":
        text, _, err = _utf8(data)
        if err is None:
            try:
                whole = json.loads(text.lstrip("\ufeff"))
            except ValueError:
                whole = None  # JSON lines in a .json file (datasets reads those too)
            if isinstance(whole, list):
                for i, obj in enumerate(whole, 1):
                    yield (i, obj, None) if isinstance(obj, dict) else (i, None, f"item {i} is {type(obj).__name__}, not an object")
                return
            if isinstance(whole, dict):
                yield 1, None, "a JSON list of objects (or one object per line), got one object"
                return
        yield from _json_lines(data)
        return
    if suffix == ".csv":
        text, before, err = _utf8(data)
        if err:
            yield before + 1, None, err
            return
        reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff"), newline=""))
        try:
            for row in reader:
                if None in row:
                    yield reader.line_num, None, f"{len(row) - 1 + len(row[None])} fields, the header has {len(reader.fieldnames)}"
                elif any(v is None for v in row.values()):
                    yield reader.line_num, None, f"fewer fields than the header's {len(reader.fieldnames)}"
                else:
                    yield reader.line_num, row, None
        except csv.Error as e:
            yield reader.line_num, None, f"not valid CSV ({e})"
        return
    yield from _json_lines(data)


def _parquet_rows(path: Path, columns: list[str]) -> Iterator[tuple[int, dict | None, str | None]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - any reader error: not a usable parquet file
        yield 0, None, f"not a readable parquet file ({type(e).__name__}: {e}; truncated?)"
        return
    names = set(pf.schema_arrow.names)
    lacking = [c for c in columns if c not in names]
    if lacking:
        yield 0, None, f"no column(s) {lacking}; columns: {sorted(names)}"
        return
    n = 0
    try:
        for batch in pf.iter_batches(columns=list(columns) or None, batch_size=65536):
            for row in batch.to_pylist():
                n += 1
                yield n, row, None
    except Exception as e:  # noqa: BLE001
        yield n + 1, None, f"unreadable from here on ({type(e).__name__}: {e})"


@dataclass
class PromptScan:
    rows: int  # usable rows over all files (before data.limit)
    problems: list[str]  # "file:line: what" (the same problem's lines together), MAX_LISTED per file


def scan_prompt_files(spec: PromptSpec) -> PromptScan:
    """Parse every row of ``data.path`` and check it (:func:`row_problem`); nothing is loaded."""
    if "{prompt}" not in spec.prompt_template:
        return PromptScan(0, [f"data.prompt_template={spec.prompt_template!r}: must contain {{prompt}} "
                              "(the row's data.prompt_field)"])
    _, files = _data_files(str(spec.path))
    columns = [spec.prompt_field] + [c for c in (spec.answer_field, spec.id_field) if c]
    columns += [f for f in template_fields(spec.prompt_template) if f != "prompt" and f not in columns]
    total, problems = 0, []
    for f in map(Path, files):
        lines: dict[str, list[int]] = {}  # problem -> the lines that have it
        rows = 0
        for line, row, err in iter_file_rows(f, columns):
            why = err or row_problem(row, spec)
            if why is None:
                rows += 1
            else:
                lines.setdefault(why, []).append(line)
        unit = "row" if f.suffix == ".parquet" else "line"
        for why, where in list(lines.items())[:MAX_LISTED]:
            at = ", ".join(map(str, where[:MAX_LISTED])) + (f" and {len(where) - MAX_LISTED} more" if len(where) > MAX_LISTED else "")
            if where == [0]:
                problems.append(f"{f}: {why}")
            elif len(where) == 1 and unit == "line":
                problems.append(f"{f}:{where[0]}: {why}")
            else:
                problems.append(f"{f}: {unit}{'s' if len(where) > 1 else ''} {at}: {why}")
        if len(lines) > MAX_LISTED:
            rest = sum(len(v) for v in list(lines.values())[MAX_LISTED:])
            problems.append(f"{f}: ... and {rest} more bad {unit}(s) with other problems")
        if rows == 0 and not lines:
            problems.append(f"{f}: no rows (an empty file)")
        total += rows
    return PromptScan(total, problems)
