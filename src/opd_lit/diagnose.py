"""``python -m opd_lit.diagnose run_id=ID``: the paper's diagnostics of finished runs.

Re-draws every figure from the raw numbers logged with the run(s) (the CSVs under the
``diagnostics/`` artifacts and the logged metrics; no model is loaded) into ``out``:

    python -m opd_lit.diagnose run_id=0a1b2c...                 # one run (Figures 1, 2/5, 3, 6, 8)
    python -m opd_lit.diagnose run_id=ID1,ID2 step=20           # several runs, the window ending at step 20
    python -m opd_lit.diagnose experiment=opd_lit               # every run of an experiment (adds Figure 7)
    python -m opd_lit.diagnose run_dir=outputs/.../csv/version_0  # a logger=csv run

Keys: ``run_id``, ``experiment``, ``run_dir`` (comma-separated lists), ``tracking_uri``
(default: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``), ``out`` (default
``diagnostics_out``), ``step`` (a window's last step; default: every window / the latest),
``figures`` (comma-separated subset), ``normalize`` (recompute the normalised curves of
Figures 1/2/5: ``mean``, ``first_bin``, ``max``, ``none``). A figure a run lacks the data for is reported with what
it needs and which runs have it; the others still render.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from opd_lit.diagnostics import figures as F
from opd_lit.diagnostics.cross_run import (
    FIXED_PREFIX,
    KEPT,
    RELEASE_METHODS,
    RELEASE_POS,
    RESPONSE_LEN,
    RunRecord,
    eval_metric_keys,
    fixed_prefix_missing,
    fixed_prefix_rows,
    prefix_len,
    response_length_rows,
)
from opd_lit.diagnostics.release_stats import release_summary
from opd_lit.diagnostics.tables import num, read_csv

KEYS = ("run_id", "experiment", "run_dir", "tracking_uri", "out", "step", "figures", "normalize")
ALL_FIGURES = tuple(f.name for f in F.PER_RUN) + (F.FIXED.name,)


class DiagnoseError(RuntimeError):
    pass


def parse_args(argv: Sequence[str] | None) -> dict[str, str]:
    ap = argparse.ArgumentParser(
        prog="python -m opd_lit.diagnose", description=__doc__.split("\n\n")[0],
        epilog="keys: " + ", ".join(KEYS) + "; figures: " + ", ".join(ALL_FIGURES),
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    out: dict[str, str] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        key = key.lstrip("-").replace("-", "_")
        if not sep:
            raise DiagnoseError(f"{item!r}: expected key=value with key in {list(KEYS)}")
        if key not in KEYS:
            raise DiagnoseError(f"unknown key {key!r}; allowed: {list(KEYS)}")
        out[key] = value
    return out


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# ---- runs as records -----------------------------------------------------------------------


def mlflow_record(client, run) -> RunRecord:
    from opd_lit.tracking import metric_history

    keys = [KEPT, RELEASE_POS, RESPONSE_LEN, *eval_metric_keys(list(run.data.metrics))]
    metrics = {k: metric_history(client, run.info.run_id, k) for k in keys if k in run.data.metrics}
    return RunRecord(
        run_id=run.info.run_id, name=run.info.run_name or "", method=run.data.tags.get("method", ""),
        params=dict(run.data.params), tags=dict(run.data.tags), metrics=metrics,
    )


def csv_record(run_dir: Path) -> RunRecord:
    from opd_lit.diagnostics.runs import csv_run_metrics

    params: dict[str, str] = {}
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        import yaml

        from opd_lit.tracking import flatten

        params = {k: str(v) for k, v in flatten(yaml.safe_load(cfg.read_text()) or {}).items()}
    method = params.get("method.name", "")
    return RunRecord(run_id=str(run_dir), name=run_dir.name, method=method, params=params,
                     tags={"method": method, "label": params.get("label", method)},
                     metrics=csv_run_metrics(run_dir))


def _has_figure(run, name: str) -> bool:
    return name in _split(run.data.tags.get("diagnostics"))


def _runs_with(candidates, name: str, exclude: set[str]) -> list[str]:
    return [f"{r.info.run_id} ({r.data.tags.get('method', '?')})" for r in candidates
            if r.info.run_id not in exclude and _has_figure(r, name)]


def _sample(items: list[str], most: int = 8) -> str:
    if not items:
        return "none"
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


# ---- the report ------------------------------------------------------------------------------


def figure1_lines(rows: list[dict]) -> list[str]:
    """The numbers of the latest Figure 1 window, one line per bin."""
    if not rows:
        return []
    last = max(int(num(r["step"])) for r in rows)
    cur = sorted((r for r in rows if int(num(r["step"])) == last), key=lambda r: int(num(r["bin"])))
    r0 = cur[0]
    out = [f"Figure 1, steps {int(num(r0['step_from']))}-{last} ({int(num(r0['rollouts']))} rollouts): "
           f"bin  position   tokens  mean A_t  std A_t  std (normalised: {r0.get('normalize', 'first_bin')})"
           "  along-rollout std (normalised)"]
    for r in cur:
        out.append(f"  {int(num(r['bin'])):>3}  {num(r['bin_lo']):.2f}-{num(r['bin_hi']):.2f}  "
                   f"{int(num(r['tokens'])):>6}  {num(r['adv_mean']):8.3f}  {num(r['adv_std']):7.3f}  "
                   f"{num(r['adv_std_norm']):8.3f}  {num(r['adv_std_within_norm']):8.3f}")
    return out


def figure3_lines(rows: list[dict], step: int | None = None) -> list[str]:
    if not rows:
        return []
    last = max(int(num(r["step"])) for r in rows) if step is None else step
    cur = [r for r in rows if int(num(r["step"])) == last]
    if not cur:
        return []
    s = release_summary(cur)
    allrows = release_summary(rows)

    def f(x, p=3):
        return "n/a" if not math.isfinite(x) else f"{x:.{p}f}"

    return [
        f"Figure 3, steps {int(num(cur[0]['step_from']))}-{last}: {int(s['samples'])} rollouts, "
        f"acceptance rate {f(s['acceptance_rate'])} ({int(s['accepted'])} accepted); accepted releases: "
        f"BIC gain mean {f(s['bic_gain_mean'])} (median {f(s['bic_gain_median'])}), segment score "
        f"pre {f(s['pre_mean'])} -> post {f(s['post_mean'])} (drop {f(s['drop_mean'])}, downward in "
        f"{f(100 * s['downward_frac'], 0)}%), relative release position mean {f(s['release_pos_frac_mean'])} "
        f"(median {f(s['release_pos_frac_median'])}, std {f(s['release_pos_frac_std'])}); "
        f"kept fraction {f(s['kept_frac_mean'])}",
        f"  all windows: {int(allrows['samples'])} rollouts, acceptance rate {f(allrows['acceptance_rate'])}, "
        f"mean release position {f(allrows['release_pos_frac_mean'])}",
    ]


def diagnose(opts: dict[str, str], echo=print) -> dict:
    """Run the diagnostics; returns ``{"written": {...}, "missing": {...}}`` keyed by run / "cross-run"."""
    run_ids, experiments = _split(opts.get("run_id")), _split(opts.get("experiment"))
    run_dirs = _split(opts.get("run_dir"))
    if not (run_ids or experiments or run_dirs):
        raise DiagnoseError("nothing to diagnose: pass run_id=ID[,ID], experiment=NAME or run_dir=PATH")
    wanted = _split(opts.get("figures")) or list(ALL_FIGURES)
    unknown = sorted(set(wanted) - set(ALL_FIGURES))
    if unknown:
        raise DiagnoseError(f"figures: unknown {unknown}; available: {list(ALL_FIGURES)}")
    step = int(opts["step"]) if opts.get("step") else None
    from opd_lit.diagnostics.by_position import NORMALIZE

    if opts.get("normalize") and opts["normalize"] not in NORMALIZE:
        raise DiagnoseError(f"normalize={opts['normalize']!r} is not one of {list(NORMALIZE)}")
    out = Path(opts.get("out") or "diagnostics_out")
    written: dict[str, dict[str, list[str]]] = {}
    missing: dict[str, dict[str, str]] = {}
    records: list[RunRecord] = []

    client, runs, siblings = None, [], []
    if run_ids or experiments:
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from opd_lit.tracking import experiment_runs, find_runs, mlflow_client

        client = mlflow_client(opts.get("tracking_uri"))
        try:
            runs = find_runs(client, run_ids, experiments)
        except LookupError as e:
            raise DiagnoseError(str(e)) from None
        exp_ids = sorted({r.info.experiment_id for r in runs})
        siblings = experiment_runs(client, exp_ids) if exp_ids else []

    per_run = [f for f in F.PER_RUN if f.name in wanted and f is not F.LENGTH]
    sources: list[tuple[str, RunRecord, Path | None]] = []
    with tempfile.TemporaryDirectory(prefix="opd_diagnose_") as tmp:
        from opd_lit.diagnostics.runs import download_artifact_dir

        for run in runs:
            rec = mlflow_record(client, run)
            records.append(rec)
            src = download_artifact_dir(client, run.info.run_id, F.ROOT, Path(tmp) / run.info.run_id)
            sources.append((run.info.run_id, rec, src))
        for d in run_dirs:
            path = Path(d)
            if not path.is_dir():
                raise DiagnoseError(f"run_dir={d}: not a directory")
            rec = csv_record(path)
            records.append(rec)
            src = path / F.ROOT
            sources.append((str(path), rec, src if src.is_dir() else None))

        selected = {r.run_id for r in records}
        for key, rec, src in sources:
            dest = out / Path(key).name
            got, lack = F.redraw(src, dest, step, wanted, opts.get("normalize")) if src is not None else ({}, {})
            got = {k: v for k, v in got.items() if k in wanted}
            if src is None:
                lack = {f.name: f"the run logged no {F.ROOT}/ artifacts (diagnostics.enabled=false, or "
                        "a run older than the diagnostics)" for f in F.PER_RUN}
            msgs = {}
            for spec in per_run:
                if spec.name in got:
                    continue
                have = _runs_with(siblings, spec.name, {rec.run_id})
                reason = lack.get(spec.name, "no data")
                needs = "" if spec.needs in reason else f" It needs {spec.needs}."
                msgs[spec.name] = (f"{spec.paper} ({spec.name}) is not available for run {rec.short()}: "
                                   f"{reason}.{needs} Runs that have it: {_sample(have)}")
            written[key] = {k: [str(p) for p in v] for k, v in got.items()}
            missing[key] = msgs
            echo(f"== run {rec.short()} -> {dest}")
            for name, files in sorted(got.items()):
                echo(f"  {name}: " + ", ".join(Path(p).name for p in files))
            for msg in msgs.values():
                echo(f"  MISSING {msg}")
            if F.ADVANTAGE.name in got:
                for line in figure1_lines(read_csv(got[F.ADVANTAGE.name][0])):
                    echo("  " + line)
            if F.RELEASE.name in got:
                for line in figure3_lines(read_csv(got[F.RELEASE.name][0]), step):
                    echo("  " + line)

    cross: dict[str, list[str]] = {}
    cross_missing: dict[str, str] = {}
    if F.LENGTH.name in wanted:
        rows = response_length_rows(records)
        if rows:
            cross[F.LENGTH.name] = [str(p) for p in F.write_figure(F.LENGTH.name, rows, out)]
        else:
            cross_missing[F.LENGTH.name] = (f"{F.LENGTH.paper}: none of the selected runs logged {RESPONSE_LEN}; "
                                            f"it needs {F.LENGTH.needs}")
    if F.FIXED.name in wanted:
        problems = fixed_prefix_missing(records)
        rows = fixed_prefix_rows(records)
        if not problems and rows:
            cross[F.FIXED.name] = [str(p) for p in F.write_figure(F.FIXED.name, rows, out)]
        else:
            pool = siblings
            fixed = [f"{r.info.run_id} (L={r.data.params.get('method.prefix_len', '?')})" for r in pool
                     if r.data.tags.get("method") == FIXED_PREFIX and r.info.run_id not in selected]
            rel = [f"{r.info.run_id} ({r.data.tags.get('method')})" for r in pool
                   if r.data.tags.get("method") in RELEASE_METHODS and r.info.run_id not in selected]
            cross_missing[F.FIXED.name] = (
                f"{F.FIXED.paper} ({F.FIXED.name}) cannot be drawn from the selected runs: "
                f"{'; '.join(problems) or 'no usable run'}. It needs {F.FIXED.needs}. "
                f"Other runs in the same experiment(s): fixed_prefix: {_sample(fixed)}; "
                f"release: {_sample(rel)} (pass experiment=NAME or their run ids)")
    written["cross-run"] = cross
    missing["cross-run"] = cross_missing
    echo(f"== across {len(records)} run(s) -> {out}")
    for name, files in sorted(cross.items()):
        echo(f"  {name}: " + ", ".join(Path(p).name for p in files))
    for msg in cross_missing.values():
        echo(f"  MISSING {msg}")
    for rec in records:
        if rec.method == FIXED_PREFIX and prefix_len(rec) is None:
            echo(f"  note: fixed_prefix run {rec.run_id} has no prefix_len param")
    return {"written": written, "missing": missing}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_args(argv)
        result = diagnose(opts)
    except DiagnoseError as e:
        print(f"opd_lit.diagnose: {e}", file=sys.stderr)
        return 2
    drew = any(files for per in result["written"].values() for files in per.values())
    return 0 if drew else 1


if __name__ == "__main__":
    sys.exit(main())
