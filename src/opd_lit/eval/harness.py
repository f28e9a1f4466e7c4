"""One evaluation over the configured benchmarks: generate (or read saved responses), grade,
score, and turn the result into metrics, per-sample records and a table.

Shared by the in-training :class:`~opd_lit.eval.callback.EvalCallback` and by
``python -m opd_lit.evaluate``. The ``eval`` config node (``conf/eval/*.yaml``) holds the run
settings (``EvalSettings``), the list of benchmarks to run, and one node per benchmark
(``BenchmarkSpec``).

Score of a benchmark: the mean over problems of the fraction of that problem's samples that
are correct (avg@n; pass@1 averaged over samples for code). Metrics:

- ``eval/<benchmark>/score`` (and ``eval/<benchmark>/<alias>`` when the benchmark has an
  alias: the toy logs ``eval/toy/accuracy``), ``eval/<benchmark>/extracted_frac``,
  ``eval/<benchmark>/truncated_frac``, ``eval/<benchmark>/response_len_mean``,
  ``eval/<benchmark>/problems_per_s``; code benchmarks ``eval/<benchmark>/isolation``
  (1 = their programs ran in the jail, 0 = without it);
- the teacher (``teacher_at_start``): ``eval/<benchmark>/teacher_score`` (and
  ``teacher_<alias>``);
- groups (``averages``): ``eval/<group>`` is the plain mean of its members' scores
  (``eval/math5_avg``), ``eval/teacher_<group>`` for the teacher.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from opd_lit.eval.benchmarks import (
    Benchmark,
    BenchmarkDataError,
    BenchmarkSpec,
    Problem,
    RowError,
    load_benchmark,
    registry,
)
from opd_lit.eval.graders import Grade
from opd_lit.eval.sandbox import Isolation, Sandbox, SandboxLimits

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    """``eval.*`` run settings (every other key of ``eval`` is a benchmark node)."""

    benchmarks: list[str] = field(default_factory=list)
    every_n_steps: int = 0  # training: every N optimizer steps (0 = never)
    at_start: bool = False  # training: before the first step
    at_end: bool = True  # training: after the last step
    teacher_at_start: bool = False  # training: the teacher once at the start (the gap)
    num_problems: int | None = None  # at most this many problems per benchmark (toy: how many)
    samples: int | None = None  # override every benchmark's samples per problem
    max_new_tokens: int | None = None  # override every benchmark's response budget
    temperature: float | None = None  # override every benchmark's temperature
    top_p: float | None = None  # override every benchmark's top_p
    skip_bad_rows: bool = False  # malformed rows: skip (with a warning) instead of failing
    allow_unsandboxed: bool = False  # run generated programs even where the jail is missing
    save_samples: bool = True  # log the per-sample JSONL as an artifact
    batch_sequences: int = 256  # at most this many sequences (prompts x samples) per generate call
    averages: dict[str, list[str]] = field(default_factory=dict)
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)

    def __post_init__(self):
        if self.every_n_steps is None or self.every_n_steps < 0:
            raise ValueError(f"eval.every_n_steps={self.every_n_steps}: must be >= 0 (0 = never)")
        if self.num_problems is not None and self.num_problems < 1:
            raise ValueError(f"eval.num_problems={self.num_problems}: must be >= 1 (or null for all)")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"eval.samples={self.samples}: must be >= 1 (or null)")
        if self.batch_sequences < 1:
            raise ValueError(f"eval.batch_sequences={self.batch_sequences}: must be >= 1")


@dataclass
class EvalConfig:
    settings: EvalSettings
    specs: dict[str, BenchmarkSpec]

    @property
    def selected(self) -> list[BenchmarkSpec]:
        return [self.specs[name] for name in self.settings.benchmarks]


def parse_eval_config(values: dict[str, Any]) -> EvalConfig:
    """Split the ``eval`` node into run settings and benchmark specs, checking every key."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(values):
        values = OmegaConf.to_container(values, resolve=True)
    values = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
              for k, v in dict(values or {}).items()}
    setting_keys = {f.name for f in fields(EvalSettings)}
    settings_values = {k: values.pop(k) for k in list(values) if k in setting_keys}
    not_nodes = sorted(k for k, v in values.items() if not isinstance(v, dict))
    if not_nodes:
        raise ValueError(
            f"eval: unknown key(s) {not_nodes}; settings: {sorted(setting_keys)}, and one node per benchmark"
        )
    settings_values["sandbox"] = SandboxLimits.from_dict(settings_values.get("sandbox"))
    settings_values["averages"] = {k: list(v) for k, v in (settings_values.get("averages") or {}).items()}
    settings_values["benchmarks"] = list(settings_values.get("benchmarks") or [])
    settings = EvalSettings(**settings_values)
    specs = {name: BenchmarkSpec.from_dict(name, node) for name, node in values.items()}
    if not settings.benchmarks:
        raise ValueError(f"eval.benchmarks is empty; defined benchmarks: {sorted(specs)}")
    unknown = [b for b in settings.benchmarks if b not in specs]
    if unknown:
        raise ValueError(
            f"eval.benchmarks: {unknown} not defined; defined here: {sorted(specs)} "
            f"(pick an eval= config that defines them, e.g. eval=math5)"
        )
    for group, members in settings.averages.items():
        missing = [m for m in members if m not in specs]
        if missing:
            raise ValueError(f"eval.averages.{group}: {missing} are not benchmarks defined here")
    return EvalConfig(settings, specs)


@dataclass
class SampleRecord:
    """One graded response: the per-sample JSONL line."""

    benchmark: str
    problem_id: str
    sample: int
    response: str
    extracted: str | None
    correct: bool
    gold: str | None = None
    detail: str | None = None
    response_tokens: int | None = None
    truncated: bool | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


@dataclass
class BenchmarkResult:
    name: str
    title: str
    score: float
    num_problems: int
    samples_per_problem: int
    num_samples: int
    extracted_frac: float
    truncated_frac: float | None
    response_len_mean: float | None
    seconds: float
    records: list[SampleRecord]
    missing_problems: int = 0
    isolation: Isolation | None = None  # code benchmarks: how their programs ran

    @property
    def problems_per_s(self) -> float:
        return self.num_problems / self.seconds if self.seconds > 0 else float("nan")

    def samples_jsonl(self) -> str:
        return "".join(r.to_json() + "\n" for r in self.records)


@dataclass
class EvalResult:
    results: dict[str, BenchmarkResult]
    averages: dict[str, float]
    aliases: dict[str, str | None]
    seconds: float = 0.0

    def metrics(self, teacher: bool = False, extras: bool = True) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, r in self.results.items():
            alias = self.aliases.get(name)
            if teacher:
                out[f"eval/{name}/teacher_score"] = r.score
                if alias:
                    out[f"eval/{name}/teacher_{alias}"] = r.score
                continue
            out[f"eval/{name}/score"] = r.score
            if alias:
                out[f"eval/{name}/{alias}"] = r.score
            if extras:
                out[f"eval/{name}/extracted_frac"] = r.extracted_frac
                if r.truncated_frac is not None:
                    out[f"eval/{name}/truncated_frac"] = r.truncated_frac
                if r.response_len_mean is not None:
                    out[f"eval/{name}/response_len_mean"] = r.response_len_mean
                if r.seconds > 0:
                    out[f"eval/{name}/problems_per_s"] = r.problems_per_s
                if r.isolation is not None:
                    out[f"eval/{name}/isolation"] = r.isolation.level
        for group, value in self.averages.items():
            out[f"eval/teacher_{group}" if teacher else f"eval/{group}"] = value
        return out

    def headline(self, teacher: bool = False) -> dict[str, float]:
        return self.metrics(teacher=teacher, extras=False)

    def samples_jsonl(self) -> str:
        return "".join(r.samples_jsonl() for r in self.results.values())


# ---- the evaluator ------------------------------------------------------------------------

# Key names a responses file may use (the first present wins).
RESPONSE_KEYS = ("response", "completion", "generation", "output", "model_output", "prediction", "text")
ID_KEYS = ("id", "question_id", "task_id", "unique_id", "problem_idx", "idx", "qid", "Record ID")
BENCHMARK_KEYS = ("benchmark", "dataset", "benchmark_name")
SAMPLE_KEYS = ("sample", "sample_idx", "sample_index", "sample_id")


def _first(rec: dict, keys) -> Any:
    return next((rec[k] for k in keys if rec.get(k) is not None), None)


class Evaluator:
    """Loads the selected benchmarks once; evaluates a model, or re-grades saved responses."""

    def __init__(self, config: EvalConfig | dict[str, Any]):
        if not isinstance(config, EvalConfig):
            config = parse_eval_config(config)
        self.config = config
        self.settings = config.settings
        self.benchmarks: dict[str, Benchmark] = {}
        # Programs run only in the jail, unless eval.allow_unsandboxed (decided once, here:
        # a refusal fails before any model is loaded).
        self.sandbox: Sandbox | None = None
        if any(spec.grader == "code" for spec in config.selected):
            self.sandbox = Sandbox(self.settings.sandbox, allow_unsandboxed=self.settings.allow_unsandboxed)
        for spec in config.selected:
            self.benchmarks[spec.name] = load_benchmark(
                spec, limit=self.settings.num_problems, skip_bad_rows=self.settings.skip_bad_rows
            )
            log.debug("benchmark %s: %d problems", spec.name, len(self.benchmarks[spec.name].problems))

    # -- sampling settings, with the global overrides --
    def samples(self, spec: BenchmarkSpec) -> int:
        return self.settings.samples or spec.samples

    def sampling_params(self, spec: BenchmarkSpec):
        from opd_lit.rollout import SamplingParams

        s = self.settings
        return SamplingParams(
            max_new_tokens=s.max_new_tokens or spec.max_new_tokens,
            temperature=s.temperature if s.temperature is not None else spec.temperature,
            top_p=s.top_p if s.top_p is not None else spec.top_p,
            top_k=spec.top_k,
            greedy=spec.greedy,
        )

    # -- generation --
    def evaluate(
        self,
        engine,
        tokenizer,
        eos_ids: list[int],
        template_kwargs: dict[str, Any] | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> EvalResult:
        """Sample every benchmark's budget with ``engine`` and grade it."""
        from opd_lit.models import render_prompt

        template_kwargs = dict(template_kwargs or {})
        t_all = time.perf_counter()
        results = {}
        eos = set(eos_ids)
        for name, bench in self.benchmarks.items():
            spec = bench.spec
            n = self.samples(spec)
            params = self.sampling_params(spec)
            if spec.greedy and n > 1:
                log.warning("benchmark %s: greedy decoding with %d samples gives %d identical responses", name, n, n)
            t0 = time.perf_counter()
            if bench.task.per_sample_prompt:
                units = [(p, s) for p in bench.problems for s in range(n)]
                per_call, n_call = max(1, self.settings.batch_sequences), 1
            else:
                units = [(p, 0) for p in bench.problems]
                per_call, n_call = max(1, self.settings.batch_sequences // n), n
            rows: list[tuple[Problem, int, str, int, bool]] = []
            done = 0
            for start in range(0, len(units), per_call):
                chunk = units[start : start + per_call]
                prompts = [render_prompt(tokenizer, bench.messages(p, s), **template_kwargs) for p, s in chunk]
                gen = engine.generate(prompts, n_call, params)
                texts = tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
                k = 0
                for p, s in chunk:
                    for j in range(n_call):
                        ids = gen.response_ids[k]
                        sample = s if n_call == 1 else j
                        cut = len(ids) >= params.max_new_tokens and (not ids or ids[-1] not in eos)
                        rows.append((p, sample, texts[k], len(ids), cut))
                        k += 1
                done += len(chunk)
                if on_progress is not None:
                    on_progress(name, done, len(units))
            results[name] = self._grade(bench, rows, t0)
            log.debug("%s: score %.4f (%d problems x %d samples, %.1fs)", name, results[name].score,
                     results[name].num_problems, n, results[name].seconds)
        return self._result(results, time.perf_counter() - t_all)

    # -- re-grading --
    def regrade(self, path: str | Path) -> EvalResult:
        """Grade saved responses: the per-sample JSONL evaluation writes, or any JSONL with a
        problem id and a response per line, under the usual key names (``RESPONSE_KEYS``,
        ``ID_KEYS`` or the benchmark's own id field, ``BENCHMARK_KEYS``, ``SAMPLE_KEYS``).

        A line's benchmark is named by its name or its title (case-insensitive); a benchmark
        of the registry that is not selected is skipped (logged); a name that is no benchmark
        at all is an error (the scores would silently change)."""
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"responses={str(path)!r}: no such file")
        t_all = time.perf_counter()
        by_bench: dict[str, list[tuple[Problem, int, str, int | None, bool | None]]] = defaultdict(list)
        counters: dict[tuple[str, str], int] = defaultdict(int)
        bad: list[tuple[int, str]] = []
        unknown: dict[str, list[int]] = defaultdict(list)
        skipped: dict[str, int] = defaultdict(int)
        names = self._benchmark_names()
        single = next(iter(self.benchmarks)) if len(self.benchmarks) == 1 else None
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line.decode("utf-8"))
                    if not isinstance(rec, dict):
                        raise RowError("expected a JSON object")
                    given = _first(rec, BENCHMARK_KEYS)
                    if given is None and single is None:
                        raise RowError(
                            f"no benchmark field ({'/'.join(BENCHMARK_KEYS)}), and "
                            f"{len(self.benchmarks)} benchmarks are selected ({list(self.benchmarks)})"
                        )
                    name = single if given is None else names.get(str(given).strip().casefold(), "")
                    if name == "":
                        unknown[str(given)].append(lineno)
                        continue
                    if name not in self.benchmarks:
                        skipped[name] += 1
                        continue
                    bench = self.benchmarks[name]
                    id_field = bench.spec.fields.get("id")
                    keys = ("problem_id", *([id_field] if id_field else []), *ID_KEYS)
                    pid = _first(rec, keys)
                    if pid is None:
                        raise RowError(f"no problem id (one of {list(dict.fromkeys(keys))})")
                    if isinstance(pid, float) and pid.is_integer():
                        pid = int(pid)
                    problem = bench.problem(str(pid))
                    if problem is None:
                        raise RowError(f"unknown {name} problem id {pid!r}")
                    response = _first(rec, RESPONSE_KEYS)
                    if not isinstance(response, str):
                        raise RowError(f"no response text (one of {list(RESPONSE_KEYS)})")
                    sample = _first(rec, SAMPLE_KEYS)
                    sample = counters[(name, problem.id)] if sample is None else int(sample)
                    counters[(name, problem.id)] += 1
                    by_bench[name].append(
                        (problem, sample, response, rec.get("response_tokens"), rec.get("truncated")))
                except (ValueError, TypeError, RowError) as e:
                    bad.append((lineno, str(e)))
        if unknown:
            shown = "; ".join(f"{n!r} (line{'s' if len(v) > 1 else ''} {', '.join(map(str, v[:5]))}"
                              f"{', ...' if len(v) > 5 else ''})" for n, v in unknown.items())
            raise BenchmarkDataError(
                f"responses={str(path)!r}: unknown benchmark(s) {shown}; benchmarks are named by "
                f"their name or title: {sorted(set(names.values()))}"
            )
        if bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in bad[:20])
            more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
            message = f"responses={str(path)!r}: {len(bad)} malformed line(s): {shown}{more}."
            if not self.settings.skip_bad_rows:
                raise BenchmarkDataError(message + " Set eval.skip_bad_rows=true to skip them.")
            log.warning("%s Skipped.", message)
        if skipped:
            log.warning("responses: lines of benchmarks not selected here, skipped: %s", dict(skipped))
        if not by_bench:
            raise BenchmarkDataError(
                f"responses={str(path)!r}: no responses for the selected benchmarks {list(self.benchmarks)}"
            )
        results = {}
        for name, rows in by_bench.items():
            results[name] = self._grade(self.benchmarks[name], rows, time.perf_counter(), timed=False)
        return self._result(results, time.perf_counter() - t_all)

    def _benchmark_names(self) -> dict[str, str]:
        """casefolded name or title -> benchmark name: the registry's, then this config's."""
        out: dict[str, str] = {}
        for name, title in [*registry().items(),
                            *((n, s.title) for n, s in self.config.specs.items())]:
            out[name.casefold()] = name
            if title:
                out.setdefault(str(title).casefold(), name)
        for name, spec in self.config.specs.items():  # a selected benchmark wins a shared title
            if name in self.benchmarks and spec.title:
                out[str(spec.title).casefold()] = name
        return out

    # -- grading and scoring --
    def _grade(self, bench: Benchmark, rows, t0: float, timed: bool = True) -> BenchmarkResult:
        sandbox = self.sandbox if bench.spec.grader == "code" else None

        def one(row) -> Grade:
            problem, sample, response, _, cut = row
            try:
                return bench.grade(problem, sample, response, sandbox, truncated=cut)
            except Exception as e:  # noqa: BLE001 - a grader crash is a wrong answer, logged
                log.warning("%s/%s sample %d: grader error %r", bench.name, problem.id, sample, e)
                return Grade(False, None, f"grader error: {type(e).__name__}: {e}")

        workers = self.settings.sandbox.workers
        if sandbox is not None and workers > 1 and len(rows) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                grades = list(pool.map(one, rows))
        else:
            grades = [one(r) for r in rows]
        records = [
            SampleRecord(
                benchmark=bench.name, problem_id=p.id, sample=s, response=resp,
                extracted=g.extracted, correct=bool(g.correct), gold=bench.gold(p, s), detail=g.detail,
                response_tokens=ntok, truncated=cut,
            )
            for (p, s, resp, ntok, cut), g in zip(rows, grades)
        ]
        per_problem: dict[str, list[bool]] = defaultdict(list)
        for r in records:
            per_problem[r.problem_id].append(r.correct)
        score = sum(sum(v) / len(v) for v in per_problem.values()) / max(1, len(per_problem))
        lens = [r.response_tokens for r in records if r.response_tokens is not None]
        cuts = [r.truncated for r in records if r.truncated is not None]
        seconds = time.perf_counter() - t0 if timed else 0.0
        missing = len(bench.problems) - len(per_problem)
        if missing:
            log.warning("%s: %d of %d problems have no response; scored over the other %d",
                        bench.name, missing, len(bench.problems), len(per_problem))
        return BenchmarkResult(
            name=bench.name,
            title=bench.spec.display,
            score=score,
            num_problems=len(per_problem),
            samples_per_problem=max((len(v) for v in per_problem.values()), default=0),
            num_samples=len(records),
            extracted_frac=sum(r.extracted is not None for r in records) / max(1, len(records)),
            truncated_frac=(sum(cuts) / len(cuts)) if cuts else None,
            response_len_mean=(sum(lens) / len(lens)) if lens else None,
            seconds=seconds,
            records=records,
            missing_problems=missing,
            isolation=sandbox.isolation if sandbox is not None else None,
        )

    def _result(self, results: dict[str, BenchmarkResult], seconds: float) -> EvalResult:
        averages = {}
        for group, members in self.settings.averages.items():
            if members and all(m in results for m in members):
                averages[group] = sum(results[m].score for m in members) / len(members)
        aliases = {name: b.spec.alias for name, b in self.benchmarks.items()}
        return EvalResult(results, averages, aliases, seconds)


# ---- output -------------------------------------------------------------------------------

def result_table(result: EvalResult, title: str = "evaluation"):
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (
        ("benchmark", "left"), ("problems", "right"), ("samples", "right"), ("score", "right"),
        ("answered", "right"), ("truncated", "right"), ("tokens", "right"), ("problems/s", "right"),
    ):
        table.add_column(col, justify=justify)

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for r in result.results.values():
        table.add_row(
            r.name if r.title == r.name else f"{r.name} ({r.title})",
            str(r.num_problems) + (f" (-{r.missing_problems})" if r.missing_problems else ""),
            str(r.samples_per_problem),
            f"{100 * r.score:.2f}",
            pct(r.extracted_frac),
            pct(r.truncated_frac),
            "-" if r.response_len_mean is None else f"{r.response_len_mean:.0f}",
            "-" if r.seconds <= 0 else f"{r.problems_per_s:.2f}",
        )
    for group, value in result.averages.items():
        table.add_row(f"[bold]{group}[/bold]", "", "", f"[bold]{100 * value:.2f}[/bold]", "", "", "", "")
    return table


def print_result(result: EvalResult, title: str = "evaluation") -> None:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 140))
    console.print(result_table(result, title))
