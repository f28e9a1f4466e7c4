"""Sweeps: the Hydra multirun configs under ``sweeps/`` that reproduce the paper's tables.

``python -m opd_lit.sweep NAME [overrides]`` checks the name (an unknown one is an error
listing the sweeps) and runs ``python -m opd_lit.train -m --config-dir sweeps --config-name
NAME [overrides]``; ``--dry-run`` composes and validates every job and prints one line each,
with the report rows the job measures and the benchmarks it evaluates (:func:`job_rows`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from omegaconf import DictConfig

SWEEPS_DIR = Path(__file__).resolve().parents[2] / "sweeps"


class UnknownSweepError(ValueError):
    pass


def available_sweeps() -> list[str]:
    return sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml"))


def check_sweep_name(name: str) -> Path:
    path = SWEEPS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UnknownSweepError(
            f"unknown sweep {name!r}; available sweeps: {', '.join(available_sweeps())} "
            f"(configs in {SWEEPS_DIR})"
        )
    return path


def job_overrides() -> list[str]:
    """The overrides that define this job within its sweep (Hydra's task overrides)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


STUDENT_ROW = "Student"
TEACHER_ROW = "Teacher"


def job_rows(cfg: DictConfig) -> list[str]:
    """The rows of the report this job measures: its own ``label`` (evaluated at the end),
    ``Student`` (its student at step 0, ``eval.at_start``) and ``Teacher``
    (``eval.teacher_at_start``), each on every benchmark of ``eval.benchmarks``. The report
    prefixes the first two with the student's name when a sweep varies the student
    (:func:`opd_lit.report.row_label`)."""
    ev = cfg.get("eval") or {}
    rows = [str(cfg.label)] if ev.get("at_end", False) else []
    if ev.get("at_start", False):
        rows.append(STUDENT_ROW)
    if ev.get("teacher_at_start", False):
        rows.append(TEACHER_ROW)
    return rows


def describe_job(cfg: DictConfig) -> str:
    """One line per job: number, method, label, student, teacher, seed, the report rows and
    benchmarks it produces, the job's overrides."""
    from hydra.core.hydra_config import HydraConfig

    num = HydraConfig.get().job.get("num", 0) if HydraConfig.initialized() else 0
    overrides = " ".join(o for o in job_overrides() if not o.startswith(("seed=", "dry_run=")))
    benchmarks = ",".join(str(b) for b in (cfg.get("eval") or {}).get("benchmarks", []))
    return (
        f"job {num:>3}  method={cfg.method.name:<15} label={str(cfg.label)!r:<28} "
        f"student={cfg.student.get('name', cfg.student.path)} teacher={cfg.teacher.get('name', cfg.teacher.path)} "
        f"seed={cfg.seed}  rows={'|'.join(job_rows(cfg)) or '-'} eval={benchmarks or '-'}  "
        f"overrides: {overrides or '-'}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_lit.sweep", description=__doc__)
    parser.add_argument("name", help=f"one of: {', '.join(available_sweeps())}")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs, load nothing")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args(argv)
    try:
        check_sweep_name(args.name)
    except UnknownSweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "opd_lit.train", "-m", "--config-dir", str(SWEEPS_DIR),
           "--config-name", args.name, *args.overrides]
    if args.dry_run:
        cmd.append("dry_run=true")
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
