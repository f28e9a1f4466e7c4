"""The report on hand-made MLflow runs: CIs, paired differences, failed jobs, bad input."""

import math

import pytest
from mlflow.tracking import MlflowClient

from opd_lit.report import ReportError, mean_ci, report


def _run(client, exp, label, seed, acc, status="FINISHED", sweep="toy_table1", start=0.2, teacher=0.95):
    r = client.create_run(exp, tags={"label": label, "method": label.lower(), "seed": str(seed), "sweep": sweep, "student": "toy-student"})
    rid = r.info.run_id
    client.log_metric(rid, "eval/toy/accuracy", start, step=0)
    client.log_metric(rid, "eval/toy/teacher_accuracy", teacher, step=0)
    client.log_metric(rid, "eval/toy/accuracy", acc, step=60)
    client.set_terminated(rid, status=status)
    return rid


@pytest.fixture
def db(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("toy_table1")
    for seed, (a, b) in enumerate([(0.30, 0.34), (0.32, 0.37), (0.28, 0.33)]):
        _run(client, exp, "OPD", seed, a)
        _run(client, exp, "Ours (BIC release)", seed, b)
    _run(client, exp, "Random release", 0, 0.99, status="FAILED")
    return uri, client


def test_mean_ci_matches_t_interval():
    m, h = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and math.isclose(h, 4.302652729749464 * 1.0 / math.sqrt(3), rel_tol=1e-9)
    assert mean_ci([5.0]) == (5.0, None)


def test_report_rows_ci_paired_difference_and_failed_job(db, tmp_path):
    uri, client = db
    table = report("toy_table1", uri, tmp_path / "out")
    rows = {r["label"]: r for r in table.rows}
    assert set(rows) == {"Teacher", "Student", "OPD", "Ours (BIC release)"}
    m, h = rows["OPD"]["cells"]["avg"]
    assert math.isclose(m, 0.30) and h > 0
    d, dh = rows["Ours (BIC release)"]["diff"]
    assert math.isclose(d, (0.04 + 0.05 + 0.05) / 3)
    assert rows["Ours (BIC release)"]["paper_avg"] == 40.1  # mirrors Table 1
    assert rows["Student"]["cells"]["toy"][0] == pytest.approx(0.2)
    # the failed job is listed, never averaged
    assert [f.label for f in table.failed] == ["Random release"]
    assert "Random release" not in rows
    md = (tmp_path / "out" / "toy_table1.md").read_text()
    assert "Random release seed 0: FAILED" in md and "+4.7" in md
    assert (tmp_path / "out" / "toy_table1.html").read_text().startswith("<!doctype html>")
    csv_text = (tmp_path / "out" / "toy_table1.csv").read_text()
    assert "FAILED" in csv_text
    summary = client.search_runs([client.get_experiment_by_name("toy_table1").experiment_id], filter_string="tags.report = 'toy_table1'")
    assert len(summary) == 1
    arts = {a.path for a in client.list_artifacts(summary[0].info.run_id, "report")}
    assert {"report/toy_table1.md", "report/toy_table1.csv", "report/toy_table1.html"} <= arts
    # a second report reuses the summary run and ignores it as data
    report("toy_table1", uri, tmp_path / "out")
    assert len(client.search_runs([summary[0].info.experiment_id], filter_string="tags.report = 'toy_table1'")) == 1


def test_report_without_finished_runs_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("empty_exp")
    _run(client, exp, "OPD", 0, 0.3, status="FAILED", sweep="x")
    with pytest.raises(ReportError, match="no finished runs"):
        report("empty_exp", uri, tmp_path / "out", log=False)
    assert not (tmp_path / "out" / "empty_exp.md").exists()


def test_report_unknown_name_lists_sweeps_and_experiments(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).create_experiment("mine")
    with pytest.raises(ReportError) as err:
        report("nope", uri, tmp_path / "out", log=False)
    assert "table1" in str(err.value) and "mine" in str(err.value)


BENCHES = ["aime25", "hmmt25_feb", "hmmt25_nov", "math500", "minerva", "gpqa_diamond"]


def _paper_run(client, exp, sweep, label, seed, final, student="Qwen3-1.7B", start=None, teacher=None):
    """A finished run with the six benchmarks of Tables 1-3 (scores 0..1)."""
    rid = client.create_run(exp, tags={"label": label, "seed": str(seed), "sweep": sweep, "student": student}).info.run_id
    for bench in BENCHES:
        if start is not None:
            client.log_metric(rid, f"eval/{bench}/score", start, step=0)
        if teacher is not None:
            client.log_metric(rid, f"eval/{bench}/teacher_score", teacher, step=0)
        client.log_metric(rid, f"eval/{bench}/score", final, step=100)
    client.set_terminated(rid)
    return rid


def test_table3_has_a_student_row_per_student_one_teacher_row_and_paired_differences(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("paper_4b")
    for student, base in (("Qwen3-4B", 0.30), ("Qwen3-8B", 0.40)):
        for seed in range(2):
            teacher = 0.6 if (student, seed) == ("Qwen3-4B", 0) else None  # once per sweep
            _paper_run(client, exp, "table3", "OPD", seed, base + 0.2, student, start=base, teacher=teacher)
            _paper_run(client, exp, "table3", "FastOPD", seed, base + 0.25 + 0.01 * seed, student, start=base)
    table = report("table3", uri, tmp_path / "out", log=False)
    rows = {r["label"]: r for r in table.rows}
    assert list(rows)[:3] == ["Teacher", "Qwen3-4B / Student", "Qwen3-4B / OPD"]  # the paper's order
    assert rows["Teacher"]["n"] == 1 and rows["Teacher"]["cells"]["avg"][0] == pytest.approx(0.6)
    assert rows["Teacher"]["cells"]["gpqa_diamond"][0] == pytest.approx(0.6)
    assert rows["Qwen3-4B / Student"]["cells"]["avg"][0] == pytest.approx(0.30)
    assert rows["Qwen3-8B / Student"]["cells"]["avg"][0] == pytest.approx(0.40)
    assert rows["Qwen3-8B / Student"]["paper_avg"] == 33.8 and rows["Teacher"]["paper_avg"] == 62.2
    # the paired difference is against the same student's OPD
    assert rows["Qwen3-8B / FastOPD"]["diff"][0] == pytest.approx(0.055)
    assert rows["Qwen3-4B / FastOPD"]["paper_avg"] == 52.5
    assert any("ExOPD" in n and "no finished run" in n for n in table.notes)
    assert any("FastOPD is Table 1's Fixed-prefix OPD-2048" in n for n in table.notes)


def test_table2_borrows_opd_and_k8_from_table1_and_says_the_k_values_are_lost(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("paper_1p7b")
    for seed in range(3):
        _paper_run(client, exp, "table1", "OPD", seed, 0.36, start=0.25, teacher=0.6 if seed == 0 else None)
        _paper_run(client, exp, "table1", "Ours (BIC release)", seed, 0.40 + 0.01 * seed, start=0.25)
        _paper_run(client, exp, "table2", "support K=4", seed, 0.38)
        _paper_run(client, exp, "table2", "release (adv-std)", seed, 0.37)
    table = report("table2", uri, tmp_path / "out", log=False)
    rows = {r["label"]: r for r in table.rows}
    assert list(rows) == ["OPD", "release (adv-std)", "support K=4", "support K=8"]  # no Student, no Teacher
    assert rows["OPD"]["n"] == 3 and rows["OPD"]["paper_avg"] == 36.8
    assert rows["support K=8"]["cells"]["avg"][0] == pytest.approx(0.41)
    assert rows["support K=8"]["paper_avg"] == 40.1
    assert rows["support K=4"]["diff"][0] == pytest.approx(0.02)  # paired with table1's OPD seeds
    notes = " ".join(table.notes)
    assert "lost in the text" in notes and "K = 8" in notes
    assert "support K=16" in notes and "support K=32" in notes  # paper rows without a run yet
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "lost in the text" in md
