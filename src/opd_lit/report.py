"""``python -m opd_lit.report NAME``: a sweep's runs as the paper's table.

NAME is a sweep under ``sweeps/`` (runs tagged ``sweep=NAME``) or an MLflow experiment.
Rows are methods (the run's ``label`` tag; prefixed by the student when a sweep varies it),
the Teacher (from the job that evaluated it at its start) and the Student (every job's
step-0 evaluation; one row per student), and any row ``paper_tables.yaml`` borrows from
another sweep (Table 2's OPD and K = 8 rows are Table 1's runs). Columns are the benchmarks
and their average; each cell is the mean ± 95% CI over runs (Student's t), with the paired
difference against ``OPD`` on the same seeds and the paper's published number beside each
row. The notes say which of the paper's rows have no run yet, and what the paper's text
leaves unsaid (the table's ``notes``). Failed or unfinished jobs are listed as such and never
averaged. Writes Markdown, CSV and a self-contained HTML file and logs them as artifacts of a
summary run in the same MLflow experiment.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import math
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from opd_lit.sweep import STUDENT_ROW, TEACHER_ROW, available_sweeps
from opd_lit.tracking import metric_history, tracking_uri

PAPER = Path(__file__).with_name("paper_tables.yaml")
SUMMARY_TAG = "opd_lit.summary"
BASELINE = "OPD"


class ReportError(RuntimeError):
    pass


def load_paper() -> dict[str, Any]:
    return yaml.safe_load(PAPER.read_text())


def t_critical(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half-width of its 95% CI (None with fewer than two values)."""
    m = statistics.fmean(values)
    if len(values) < 2:
        return m, None
    return m, t_critical(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


@dataclass
class RunScores:
    run_id: str
    label: str
    seed: str
    status: str
    student: str = "?"
    scores: dict[str, float] = field(default_factory=dict)  # benchmark -> final score (0..1)
    start: dict[str, float] = field(default_factory=dict)  # benchmark -> score at step 0
    teacher: dict[str, float] = field(default_factory=dict)


def row_label(label: str, student: str, multi_student: bool) -> str:
    """The report row of a run's ``label`` (or ``Student``): prefixed with the student's name
    (``Qwen3-4B / OPD``) when the reported runs have more than one student, as Table 3."""
    return f"{student} / {label}" if multi_student else label


def benchmark_of(metric: str) -> tuple[str, str] | None:
    """``eval/<bench>/<kind>`` -> (bench, kind) for kind in score/accuracy/teacher_*."""
    parts = metric.split("/")
    if len(parts) != 3 or parts[0] != "eval":
        return None
    return parts[1], parts[2]


def collect(client, runs) -> tuple[list[RunScores], list[RunScores]]:
    """(finished runs with scores, runs that failed / did not finish)."""
    multi_student = len({r.data.tags.get("student") for r in runs}) > 1
    done, broken = [], []
    for r in runs:
        tags = r.data.tags
        student = str(tags.get("student", "?"))
        label = row_label(tags.get("label") or tags.get("method", "?"), student, multi_student)
        rs = RunScores(r.info.run_id, label, tags.get("seed", "?"), r.info.status, student)
        if r.info.status != "FINISHED":
            broken.append(rs)
            continue
        for metric, value in r.data.metrics.items():
            parsed = benchmark_of(metric)
            if parsed is None:
                continue
            bench, kind = parsed
            if kind in ("score", "accuracy"):
                if kind == "score" or bench not in rs.scores:
                    rs.scores[bench] = value
                history = metric_history(client, r.info.run_id, metric)
                first = [v for step, v in history if step == 0]
                if first and len(history) > 1:
                    rs.start[bench] = first[0]
            elif kind.startswith("teacher_"):
                rs.teacher[bench] = value
        if rs.scores:
            done.append(rs)
        else:
            rs.status = "FINISHED (no eval metrics)"
            broken.append(rs)
    return done, broken


def find_runs(name: str, uri: str):
    """The runs of sweep ``name`` (tag ``sweep``), else of the MLflow experiment ``name``."""
    from opd_lit.tracking import experiment_runs, mlflow_client

    client = mlflow_client(uri)
    experiments = client.search_experiments()
    if name in available_sweeps():
        runs = experiment_runs(client, [e.experiment_id for e in experiments], f"tags.sweep = '{name}'")
    elif (exp := client.get_experiment_by_name(name)) is not None:
        runs = experiment_runs(client, [exp.experiment_id])
    else:
        raise ReportError(
            f"{name!r} is neither a sweep nor an MLflow experiment at {uri}. "
            f"Sweeps: {', '.join(available_sweeps())}. "
            f"Experiments: {', '.join(sorted(e.name for e in experiments)) or 'none'}."
        )
    return client, [r for r in runs if r.data.tags.get(SUMMARY_TAG) != "true"]


@dataclass
class Table:
    name: str
    columns: list[str]  # benchmark keys + "avg"
    headers: list[str]
    rows: list[dict[str, Any]]
    failed: list[RunScores]
    paper_source: str | None
    notes: list[str]


def paper_table_of(name: str) -> tuple[str, dict[str, Any]]:
    """``(table key, its paper_tables.yaml entry)`` for a sweep or a mirror of one."""
    paper = load_paper()
    mirror = paper.get("mirrors", {}).get(name, {})
    key = mirror.get("table", name)
    return key, paper["tables"].get(key, {})


def build_table(name: str, done: list[RunScores], broken: list[RunScores], notes: list[str] | None = None) -> Table:
    paper = load_paper()
    bench_names: dict[str, str] = paper["benchmarks"]
    benches = sorted({b for r in done for b in (*r.scores, *r.start, *r.teacher)}, key=lambda b: (b not in bench_names, list(bench_names).index(b) if b in bench_names else 0, b))
    in_domain = [b for b in benches if b in paper["average_of"]] or [b for b in benches if b not in bench_names]
    out_domain = [b for b in benches if b not in in_domain]
    columns = in_domain + ["avg"] + out_domain
    headers = [bench_names.get(b, b) if b != "avg" else "Avg" for b in columns]

    table_key, paper_table = paper_table_of(name)
    aliases = paper.get("mirrors", {}).get(name, {}).get("aliases", {})
    paper_rows = paper_table.get("rows", {}) or {}

    def with_avg(scores: dict[str, float]) -> dict[str, float]:
        out = dict(scores)
        vals = [scores[b] for b in in_domain if b in scores]
        if len(vals) == len(in_domain) and vals:
            out["avg"] = statistics.fmean(vals)
        return out

    def cells(score_dicts: list[dict[str, float]]) -> dict[str, list[float]]:
        filled = [with_avg(d) for d in score_dicts]
        return {c: [d[c] for d in filled if c in d] for c in columns}

    by_label: dict[str, list[RunScores]] = defaultdict(list)
    for r in done:
        by_label[r.label].append(r)
    multi_student = len({r.student for r in done}) > 1

    rows: list[dict[str, Any]] = []
    teacher = [r.teacher for r in done if r.teacher]
    if teacher:
        rows.append(_row(TEACHER_ROW, cells(teacher), len(teacher), paper_rows.get(TEACHER_ROW)))
    for student in sorted({r.student for r in done if r.start}):
        starts = [r.start for r in done if r.start and r.student == student]
        label = row_label(STUDENT_ROW, student, multi_student)
        rows.append(_row(label, cells(starts), len(starts), paper_rows.get(label)))

    for lab, group in by_label.items():
        row = _row(lab, cells([r.scores for r in group]), len(group), paper_rows.get(aliases.get(lab, lab)))
        row["seeds"] = ",".join(sorted(r.seed for r in group))
        baseline = row_label(BASELINE, group[0].student, multi_student)
        base_by_seed = {r.seed: with_avg(r.scores) for r in by_label.get(baseline, [])}
        if lab != baseline and base_by_seed:
            diffs = [with_avg(r.scores)["avg"] - base_by_seed[r.seed]["avg"] for r in group
                     if r.seed in base_by_seed and "avg" in base_by_seed[r.seed] and "avg" in with_avg(r.scores)]
            if diffs:
                row["diff"] = mean_ci(diffs)
                row["diff_n"] = len(diffs)
        rows.append(row)

    order = list(paper_rows)

    def position(row: dict[str, Any]) -> tuple[int, int, str]:
        lab = aliases.get(row["label"], row["label"])
        if lab == TEACHER_ROW:
            return (0, 0, lab)
        if lab in order:
            return (1, order.index(lab), lab)
        return (2, 0 if lab.endswith(STUDENT_ROW) else 1, lab)  # unpublished rows: students first

    rows.sort(key=position)
    notes = list(notes or [])
    if not paper_rows:
        notes.append(f"no published numbers for {table_key!r} in paper_tables.yaml")
    measured = {aliases.get(r["label"], r["label"]) for r in rows}
    missing = [lab for lab in paper_rows if lab not in measured]
    if missing:
        notes.append("paper rows with no finished run yet: " + "; ".join(missing))
    if table_key == name:  # a mirror (the toy's table1) runs another setting: not its notes
        notes += [str(n) for n in paper_table.get("notes", []) or []]
    return Table(name, columns, headers, rows, broken, paper_table.get("source"), notes)


def _row(label: str, values: dict[str, list[float]], n: int, paper_row: list[float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"label": label, "n": n, "cells": {}}
    for col, vals in values.items():
        if vals:
            row["cells"][col] = mean_ci(vals)
    if paper_row is not None:
        paper = load_paper()
        cols = paper["columns"]
        row["paper_avg"] = paper_row[cols.index("Avg")]
        row["paper"] = dict(zip(cols, paper_row))
    return row


def _fmt(cell: tuple[float, float | None] | None, scale: float = 100.0, signed: bool = False) -> str:
    if cell is None:
        return "–"
    m, h = cell
    sign = "+" if signed and m >= 0 else ""
    return f"{sign}{m * scale:.1f}" + (f" ± {h * scale:.1f}" if h is not None else "")


def render_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["Method", "n", *table.headers, f"Δ Avg vs {BASELINE} (paired)", "Paper Avg"]
    body = []
    for row in table.rows:
        body.append([
            row["label"], str(row["n"]),
            *[_fmt(row["cells"].get(c)) for c in table.columns],
            _fmt(row.get("diff"), signed=True) + (f" (n={row['diff_n']})" if "diff_n" in row else ""),
            f"{row['paper_avg']:.1f}" if "paper_avg" in row else "–",
        ])
    return header, body


def to_markdown(table: Table) -> str:
    header, body = render_rows(table)
    lines = [f"# {table.name}", "", "Scores in %, mean ± 95% CI over seeds (Student's t)."]
    if table.paper_source:
        lines.append(f"Paper numbers: {table.paper_source}.")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    if table.failed:
        lines += ["", "Failed or unfinished jobs (not averaged):", ""]
        lines += [f"- {r.label} seed {r.seed}: {r.status} (run {r.run_id})" for r in table.failed]
    lines += ["", *[f"Note: {n}" for n in table.notes]]
    return "\n".join(lines).rstrip() + "\n"


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "n", *[f"{h}_mean" for h in table.headers], *[f"{h}_ci95" for h in table.headers], "diff_vs_opd_mean", "diff_vs_opd_ci95", "paper_avg", "status"])
    for row in table.rows:
        cells = [row["cells"].get(c) for c in table.columns]
        d = row.get("diff")
        w.writerow([row["label"], row["n"], *[c[0] if c else "" for c in cells], *[c[1] if c and c[1] is not None else "" for c in cells],
                    d[0] if d else "", d[1] if d and d[1] is not None else "", row.get("paper_avg", ""), "finished"])
    for r in table.failed:
        w.writerow([r.label, 1, *[""] * (2 * len(table.headers)), "", "", "", r.status])
    return buf.getvalue()


def to_html(table: Table) -> str:
    header, body = render_rows(table)
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(table.name)}</title><style>body{{font-family:sans-serif;margin:2em}}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.failed{color:#a00}</style></head><body>",
        f"<h1>{e(table.name)}</h1><p>Scores in %, mean ± 95% CI over seeds (Student's t).</p>",
    ]
    if table.paper_source:
        parts.append(f"<p>Paper numbers: {e(table.paper_source)}.</p>")
    parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    for r in body:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>")
    parts.append("</table>")
    if table.failed:
        parts.append("<h2>Failed or unfinished jobs (not averaged)</h2><ul>")
        parts += [f"<li class='failed'>{e(r.label)} seed {e(r.seed)}: {e(r.status)} ({e(r.run_id)})</li>" for r in table.failed]
        parts.append("</ul>")
    parts += [f"<p>Note: {e(n)}</p>" for n in table.notes]
    parts.append("</body></html>")
    return "\n".join(parts)


def print_table(table: Table) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    header, body = render_rows(table)
    rt = RichTable(title=f"{table.name}: mean ± 95% CI over seeds (%)")
    for i, h in enumerate(header):
        rt.add_column(h, justify="left" if i == 0 else "right")
    for r in body:
        rt.add_row(*r)
    console = Console()
    console.print(rt)
    if table.paper_source:
        console.print(f"Paper numbers: {table.paper_source}")
    for r in table.failed:
        console.print(f"[red]failed/unfinished[/red] {r.label} seed {r.seed}: {r.status} (run {r.run_id})")
    for n in table.notes:
        console.print(f"note: {n}")


def log_summary(client, runs, name: str, files: list[Path]) -> str:
    """Log the report files into one summary run per report name (reused on re-runs)."""
    exp_id = runs[0].info.experiment_id
    existing = client.search_runs([exp_id], filter_string=f"tags.`{SUMMARY_TAG}` = 'true' and tags.report = '{name}'")
    run_id = existing[0].info.run_id if existing else client.create_run(
        exp_id, run_name=f"report-{name}", tags={SUMMARY_TAG: "true", "report": name}
    ).info.run_id
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="report")
    client.set_terminated(run_id)
    return run_id


def borrowed_runs(name: str, uri: str) -> tuple[list[RunScores], list[RunScores], list[str]]:
    """The rows ``paper_tables.yaml`` takes from other sweeps for ``name`` (its ``borrow``):
    ``(finished runs relabelled, failed ones, notes)``. Only their method scores count: a
    borrowed run's Student and Teacher evaluations stay with its own sweep."""
    _, paper_table = paper_table_of(name)
    done, broken, notes = [], [], []
    by_sweep: dict[str, dict[str, str]] = defaultdict(dict)
    for row, spec in (paper_table.get("borrow") or {}).items():
        by_sweep[str(spec["sweep"])][str(spec["label"])] = str(row)
    for sweep, relabel in by_sweep.items():
        try:
            client, runs = find_runs(sweep, uri)
        except ReportError:
            runs = []
        if runs:
            got, failed = collect(client, runs)
        else:
            got, failed = [], []
        for group, target in ((got, done), (failed, broken)):
            for r in group:
                if r.label in relabel:
                    r.label = relabel[r.label]
                    r.start, r.teacher = {}, {}
                    target.append(r)
        for label, row in relabel.items():
            n = sum(r.label == row for r in done)
            notes.append(f"row {row!r}: {n} finished run(s) of sweep {sweep!r} labelled {label!r} (the same runs as there)")
    return done, broken, notes


def report(name: str, uri: str | None = None, out: Path | None = None, log: bool = True) -> Table:
    uri = tracking_uri(uri)
    client, runs = find_runs(name, uri)
    done, broken = collect(client, runs)
    if not done:
        raise ReportError(
            f"{name!r}: no finished runs with evaluation metrics at {uri} "
            f"({len(runs)} run(s) found, {len(broken)} failed or unfinished); nothing to report."
        )
    more, more_broken, notes = borrowed_runs(name, uri)
    table = build_table(name, done + more, broken + more_broken, notes)
    out = out or Path("reports") / name
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.md", out / f"{name}.csv", out / f"{name}.html"]
    files[0].write_text(to_markdown(table))
    files[1].write_text(to_csv(table))
    files[2].write_text(to_html(table))
    print_table(table)
    if log:
        run_id = log_summary(client, runs, name, files)
        print(f"wrote {', '.join(str(f) for f in files)}; logged to MLflow run {run_id}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd_lit.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"a sweep ({', '.join(available_sweeps())}) or an MLflow experiment")
    parser.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--out", type=Path, default=None, help="directory for the files (default reports/NAME)")
    parser.add_argument("--no-log", action="store_true", help="do not log the files to MLflow")
    args = parser.parse_args(argv)
    try:
        report(args.name, args.tracking_uri, args.out, log=not args.no_log)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
