"""The figures, where they land and what they need; redrawing a run's figures from its CSVs.

A run's diagnostics directory (MLflow artifact path ``diagnostics/``, or ``<run dir>/diagnostics``
with ``logger=csv``) holds, for each figure, a CSV of the raw numbers and the PNG drawn from
it; the case studies are ``case_studies/step_<N>_rollout_<i>.{csv,html}``.
``skipped.csv`` lists the figures the run could not draw and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from opd_lit.diagnostics.tables import read_csv, write_csv

ROOT = "diagnostics"
CASE_DIR = "case_studies"
SKIPPED = "skipped.csv"


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file stem: <name>.csv / <name>.png
    paper: str  # which figure of the paper it reproduces
    needs: str  # what a run must have logged for it


ADVANTAGE = FigureSpec(
    "advantage_by_position", "Figure 1",
    "teacher and student log-probs of the sampled tokens (any method, diagnostics.enabled=true)",
)
MARGIN = FigureSpec(
    "margin_by_position", "Figures 2 and 5",
    "teacher log-probs at the student's top-K candidate ids with K >= 2 (diagnostics.margin_ks "
    "raises the method's needs.topk; a method that overrides needs may carry fewer)",
)
RELEASE = FigureSpec(
    "release_stats", "Figure 3",
    "the release rule's per-rollout decisions (method=release_bic or release_random, or any "
    "method with release.diagnose=true)",
)
CASES = FigureSpec(
    "case_studies", "Figure 6 / appendix A.4",
    "the release rule's per-rollout decisions and segment scores (as for release_stats)",
)
LENGTH = FigureSpec(
    "response_length", "Figure 8",
    "the metric rollout/response_len_mean over training steps (every run)",
)
FIXED = FigureSpec(
    "fixed_prefix_vs_release", "Figure 7",
    "runs tagged method=fixed_prefix with a method.prefix_len param and runs of a release "
    "method, each with train/kept_frac, release/release_pos_frac and eval/<bench>/accuracy "
    "(or eval/<bench>/score)",
)
PER_RUN = (ADVANTAGE, MARGIN, RELEASE, CASES, LENGTH)
CROSS_RUN = (FIXED, LENGTH)
BY_NAME = {f.name: f for f in (*PER_RUN, FIXED)}


def drawer(name: str) -> Callable:
    from opd_lit.diagnostics import plots

    return {
        ADVANTAGE.name: plots.draw_advantage,
        MARGIN.name: plots.draw_margins,
        RELEASE.name: plots.draw_release,
        LENGTH.name: plots.draw_response_length,
        FIXED.name: plots.draw_fixed_prefix,
    }[name]


def write_figure(name: str, rows: list[dict], directory: Path, columns=None, **kwargs) -> list[Path]:
    """``<directory>/<name>.csv`` and the PNG drawn from those rows."""
    csv_path = write_csv(rows, directory / f"{name}.csv", columns)
    png = drawer(name)(rows, directory / f"{name}.png", **kwargs)
    return [csv_path, png]


def write_case_study(rows: list[dict], directory: Path) -> list[Path]:
    from opd_lit.diagnostics.case_study import TOKEN_COLUMNS, render_case_study_html

    r0 = rows[0]
    stem = f"step_{int(float(r0['step'])):06d}_rollout_{int(float(r0['sample'])):03d}"
    csv_path = write_csv(rows, directory / CASE_DIR / f"{stem}.csv", TOKEN_COLUMNS)
    page = directory / CASE_DIR / f"{stem}.html"
    page.write_text(render_case_study_html(rows), encoding="utf-8")
    return [csv_path, page]


def write_skipped(reasons: dict[str, str], directory: Path) -> Path | None:
    if not reasons:
        return None
    rows = [{"figure": k, "paper": BY_NAME[k].paper if k in BY_NAME else "", "reason": v}
            for k, v in sorted(reasons.items())]
    return write_csv(rows, directory / SKIPPED, ("figure", "paper", "reason"))


def read_skipped(directory: Path) -> dict[str, str]:
    path = Path(directory) / SKIPPED
    return {r["figure"]: r["reason"] for r in read_csv(path)} if path.exists() else {}


def redraw(src: Path, out: Path, step: int | None = None, names: Sequence[str] | None = None,
           normalize: str | None = None) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Re-draw the per-run figures (``names``, default all) found in the diagnostics
    directory ``src`` into ``out`` (``normalize``: recompute the normalised curves with it).

    Returns ``(written, missing)``: the files per figure, and for each figure without data
    the reason (from the run's ``skipped.csv`` when it recorded one).
    """
    src, out = Path(src), Path(out)
    written: dict[str, list[Path]] = {}
    missing: dict[str, str] = {}
    skipped = read_skipped(src)
    names = [f.name for f in PER_RUN] if names is None else list(names)
    for spec in (ADVANTAGE, MARGIN, RELEASE, LENGTH):
        if spec.name not in names:
            continue
        path = src / f"{spec.name}.csv"
        rows = read_csv(path) if path.exists() else []
        if not rows:
            missing[spec.name] = skipped.get(spec.name, f"no {ROOT}/{spec.name}.csv in the run")
            continue
        kwargs = {"step": step} if spec is RELEASE and step is not None else {}
        if spec in (ADVANTAGE, MARGIN) and step is not None:
            chosen = [r for r in rows if int(float(r["step"])) == int(step)]
            rows = chosen or rows
        if spec in (ADVANTAGE, MARGIN) and normalize:
            from opd_lit.diagnostics.by_position import renormalize

            rows = renormalize(rows, normalize)
        columns = list(rows[0]) + [k for k in ("normalize",) if k not in rows[0] and k in rows[-1]]
        written[spec.name] = write_figure(spec.name, rows, out, columns, **kwargs)
    if CASES.name not in names:
        return written, missing
    cases = sorted((src / CASE_DIR).glob("*.csv")) if (src / CASE_DIR).is_dir() else []
    if step is not None:
        cases = [c for c in cases if c.name.startswith(f"step_{int(step):06d}_")] or cases
    for c in cases:
        rows = read_csv(c)
        if rows:
            written.setdefault(CASES.name, []).extend(write_case_study(rows, out))
    if CASES.name not in written:
        missing[CASES.name] = skipped.get(CASES.name, f"no {ROOT}/{CASE_DIR}/*.csv in the run")
    return written, missing

