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
