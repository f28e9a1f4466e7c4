"""Diagnostics (issue 6): numbers on hand-made rollouts, every artifact of a small synthetic
run, the diagnose CLI on runs logged into a temporary MLflow SQLite store, and the bad input
(a run without release decisions asked for release statistics)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opd_lit.batch import RolloutBatch
from opd_lit.diagnostics import diagnostics_callbacks
from opd_lit.diagnostics.by_position import (
    advantage_moments,
    advantage_rows,
    margin_moments,
    margin_rows,
    normalize_curve,
    relative_position_bins,
    usable_ks,
)
from opd_lit.diagnostics.callback import DiagnosticsCallback
from opd_lit.diagnostics.case_study import (
    case_study_rows,
    render_case_study_html,
    select_case_studies,
    token_pieces,
)
from opd_lit.diagnostics.cross_run import RunRecord, fixed_prefix_missing, fixed_prefix_rows
from opd_lit.diagnostics.release_stats import release_sample_rows, release_summary
from opd_lit.diagnostics.tables import read_csv
from opd_lit.release import BatchRelease, release_weights_batch

# ---- hand-made rollouts: the numbers --------------------------------------------------------


def mask_of(lengths, width):
    return (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float()  # [B, T]


def test_relative_position_bins():
    mask = mask_of([10, 3, 0], 12)
    bins = relative_position_bins(mask, 5)
    assert bins[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, -1, -1]
    assert bins[1, :3].tolist() == [0, 1, 3]  # floor(t * 5 / 3)
    assert (bins[1, 3:] == -1).all() and (bins[2] == -1).all()


def test_margin_drop_shows_in_the_right_bin_for_each_k():
    # two responses (40 and 20 tokens); the teacher's top-1/top-2 margin among the first two
    # student candidates is 3.0 up to 60% of the response and 0.5 after it; a third candidate
    # sits 0.25 below the top one, so over K=4 the margin is a flat 0.25
    lengths, width = [40, 20], 44
    mask = mask_of(lengths, width)
    lp = torch.full((2, width, 4), -30.0)
    for b, n in enumerate(lengths):
        for t in range(width):
            m = 3.0 if t < 0.6 * n else 0.5
            lp[b, t, 0], lp[b, t, 1], lp[b, t, 2] = -1.0, -1.0 - m, -1.25
            if t >= n:  # padding holds garbage that must not count
                lp[b, t, 0] = 50.0
    ms = margin_moments(lp, mask, [2, 4], num_bins=20)
    k2, k4 = ms[2].mean(), ms[4].mean()
    assert torch.allclose(k2[:12], torch.full((12,), 3.0, dtype=k2.dtype))
    assert torch.allclose(k2[12:], torch.full((8,), 0.5, dtype=k2.dtype))
    assert torch.allclose(k4, torch.full((20,), 0.25, dtype=k4.dtype))
    assert int(ms[2].count.sum()) == 60 and ms[2].rollouts == 2
    rows = margin_rows(ms, step=5, step_from=1, normalize="first_bin")
    norm = {(r["k"], r["bin"]): r["margin_norm"] for r in rows}
    assert norm[(2, 11)] == pytest.approx(1.0) and norm[(2, 12)] == pytest.approx(0.5 / 3.0)
    assert norm[(4, 19)] == pytest.approx(1.0)
    assert usable_ks([2, 4, 8, 16], 8) == ([2, 4, 8], [16])
    with pytest.raises(ValueError, match="carries 4 candidates"):
        margin_moments(lp, mask, [8])


def test_advantage_mean_and_std_per_bin():
    # A = log p_T - log p_S: rollout 0 = [1, 3 | 10, 10], rollout 1 = [5 | -5] (2 bins)
    student = torch.zeros(2, 5)
    teacher = torch.tensor([[1.0, 3.0, 10.0, 10.0, 99.0], [5.0, -5.0, 99.0, 99.0, 99.0]])
    mask = mask_of([4, 2], 5)
    m = advantage_moments(teacher, student, mask, num_bins=2)
    assert m.count.tolist() == [3.0, 3.0]
    assert m.mean().tolist() == pytest.approx([3.0, 5.0])
    assert m.std().tolist() == pytest.approx([math.sqrt(8 / 3), math.sqrt(50.0)])
    # along each rollout: only rollout 0 has two tokens per bin (std 1 and 0)
    assert m.within_std().tolist() == pytest.approx([1.0, 0.0])
    rows = advantage_rows(m, step=2, step_from=1, normalize="first_bin")
    assert rows[1]["adv_std_norm"] == pytest.approx(math.sqrt(50.0) / math.sqrt(8 / 3))
    mean = (math.sqrt(50.0) + math.sqrt(8 / 3)) / 2
    assert advantage_rows(m, 2, 1)[0]["adv_std_norm"] == pytest.approx(math.sqrt(8 / 3) / mean)  # default: mean
    assert rows[0]["rollouts"] == 2 and rows[1]["tokens"] == 3
    # the moments of two batches add up to those of the concatenated batch
    both = advantage_moments(teacher[:1], student[:1], mask[:1], 2) + advantage_moments(
        teacher[1:], student[1:], mask[1:], 2)
    assert torch.allclose(both.std(), m.std()) and torch.allclose(both.within_std(), m.within_std())


def test_renormalize_rows_read_back_from_csv():
    from opd_lit.diagnostics.by_position import PositionMoments, renormalize

    m = PositionMoments(*(torch.tensor(v, dtype=torch.float64) for v in (
        [2.0, 2.0], [2.0, 4.0], [2.0, 10.0], [1.0, 2.0], [1.0, 1.0])), rollouts=2)
    rows = [{k: str(v) for k, v in r.items()} for r in advantage_rows(m, 3, 1, "none")]
    again = renormalize(rows, "first_bin")
    assert [r["adv_std_within_norm"] for r in again] == pytest.approx([1.0, 2.0])
    assert {r["normalize"] for r in again} == {"first_bin"}


def test_normalize_curve():
    assert normalize_curve([float("nan"), 2.0, 1.0], "first_bin") == pytest.approx([math.nan, 1.0, 0.5], nan_ok=True)
    assert normalize_curve([2.0, 4.0], "mean") == pytest.approx([2 / 3, 4 / 3])
    assert normalize_curve([2.0, 4.0], "max") == pytest.approx([0.5, 1.0])
    assert all(math.isnan(v) for v in normalize_curve([0.0, 1.0], "first_bin"))
    assert normalize_curve([1.0, 3.0]) == pytest.approx([0.5, 1.5])  # default: the mean
    with pytest.raises(ValueError, match="first_bin"):
        normalize_curve([1.0], "median")


def constructed_release() -> BatchRelease:
    """Four responses (10, 20, 8 and 0 tokens; T = 20): releases at tokens 5 and 2."""
    nan = float("nan")
    f64 = torch.float64
    return BatchRelease(
        weight=torch.zeros(4, 20), keep_mask=torch.zeros(4, 20), scale=torch.ones(4),
        release_segment=torch.tensor([2, 4, 1, 0]), num_segments=torch.tensor([4, 4, 3, 0]),
        accepted=torch.tensor([True, False, True, False]),
        bic_gain=torch.tensor([2.0, 0.0, 4.0, 0.0], dtype=f64),
        release_token=torch.tensor([5, 20, 2, 20]),
        segment_scores=torch.zeros(4, 4, dtype=f64),
        pre_mean=torch.tensor([0.8, nan, 0.6, nan], dtype=f64),
        post_mean=torch.tensor([0.2, nan, 0.4, nan], dtype=f64),
    )


def test_release_statistics_on_a_constructed_batch_release():
    rows = release_sample_rows(constructed_release(), mask_of([10, 20, 8, 0], 20), train_step=7)
    assert [r["sample"] for r in rows] == [0, 1, 2]  # the empty response is left out
    assert [r["release_pos_frac"] for r in rows] == pytest.approx([0.5, 1.0, 0.25])
    s = release_summary(rows)
    assert s["acceptance_rate"] == pytest.approx(2 / 3)
    assert s["bic_gain_mean"] == pytest.approx(3.0) and s["bic_gain_median"] == pytest.approx(3.0)
    assert (s["pre_mean"], s["post_mean"], s["drop_mean"]) == pytest.approx((0.7, 0.3, 0.4))
    assert s["downward_frac"] == 1.0
    assert s["release_pos_frac_mean"] == pytest.approx(0.375)
    assert s["kept_frac_mean"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    # read back from CSV (strings) the summary is the same
    as_text = [{k: str(v) for k, v in r.items()} for r in rows]
    assert release_summary(as_text)["release_pos_frac_mean"] == pytest.approx(0.375)
    # case studies: accepted releases by decreasing gain first, then the longest other
    assert select_case_studies(constructed_release(), mask_of([10, 20, 8, 0], 20), 3) == [2, 0, 1]


def test_release_rule_drop_lands_where_the_case_study_says():
    # margins 2.0 over four 5-token segments, then 0.1 over three: the rule releases at segment 4
    T = 35
    lp = torch.zeros(1, T, 2)
    lp[0, :, 1] = torch.where(torch.arange(T) < 20, -2.0, -0.1)
    seg = (torch.arange(T) // 5).unsqueeze(0)
    mask = torch.ones(1, T)
    rel = release_weights_batch(torch.zeros(1, T), mask, lp, seg)
    assert bool(rel.accepted[0]) and int(rel.release_token[0]) == 20
    pieces = [f"w{t}{'.' if t % 5 == 4 else ''} " for t in range(T)]
    rows = case_study_rows(
        pieces, rel.keep_mask[0], seg[0], rel.segment_scores[0], lp[0, :, 0] - lp[0, :, 1],
        torch.zeros(T), step=3, sample=0, accepted=True, bic_gain=float(rel.bic_gain[0]),
        release_segment=int(rel.release_segment[0]), release_token=20,
        pre_mean=float(rel.pre_mean[0]), post_mean=float(rel.post_mean[0]),
    )
    assert [r["kept"] for r in rows] == [1] * 20 + [0] * 15
    assert rows[0]["segment_score"] == pytest.approx(math.log1p(2.0))


def test_case_study_html_is_self_contained_and_escaped():
    rows = [
        {"step": 1, "sample": 4, "pos": t, "text": txt, "segment": t // 2,
         "segment_score": 1.0 if t < 2 else 0.2, "kept": int(t < 2), "margin": 0.5,
         "advantage": 0.1, "accepted": 1, "bic_gain": 3.5, "release_segment": 1,
         "release_token": 2, "pre_mean": 1.0, "post_mean": 0.2}
        for t, txt in enumerate(["Let ", "x<y & ", "so ", "</div>"])
    ]
    page = render_case_study_html(rows)
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "x&lt;y &amp; " in page and "&lt;/div&gt;" in page
    assert page.count('<span class="k0" title=') == 2 and page.count('<span class="r1 cut" title=') == 1
    assert "BIC gain 3.500" in page and "token 2 of 4" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org', "")  # nothing fetched
    no_release = [{**r, "kept": 1, "accepted": 0, "release_segment": 2, "release_token": 4} for r in rows]
    assert "no release accepted" in render_case_study_html(no_release)


def test_token_pieces_rebuild_the_text():
    vocab = {1: "He", 2: "llo", 3: " wor", 4: "ld.", 5: " Bye"}

    def decode(ids):
        return "".join(vocab[i] for i in ids)

    ids = [1, 2, 3, 4, 5] * 3
    pieces = token_pieces(decode, ids, window=3)
    assert "".join(pieces) == decode(ids) and pieces[3] == "ld."


def test_fixed_prefix_rows_and_what_figure7_needs():
    def run(rid, method, L=None, kept=1.0, pos=0.8, acc=0.5):
        params = {"method.prefix_len": str(L)} if L else {}
        return RunRecord(rid, method=method, params=params, metrics={
            "train/kept_frac": [(0, kept), (1, kept + 0.1)],
            "release/release_pos_frac": [(0, pos), (1, pos)],
            "eval/toy/accuracy": [(0, 0.1), (2, acc)], "eval/toy/teacher_accuracy": [(0, 0.9)]})

    runs = [run("c", "fixed_prefix", 64, 0.5, 0.6, 0.4), run("a", "fixed_prefix", 16, 0.2, 0.5, 0.3),
            run("r", "release_bic", None, 0.7, 0.7, 0.45), run("o", "opd")]
    assert fixed_prefix_missing(runs) == []
    rows = fixed_prefix_rows(runs)
    assert [(r["run_id"], r["label"]) for r in rows] == [("a", "L=16"), ("c", "L=64"), ("r", "release_bic")]
    assert rows[0]["kept_frac"] == pytest.approx(0.25) and rows[0]["accuracy"] == pytest.approx(0.3)
    assert rows[0]["accuracy_metric"] == "eval/toy/accuracy"
    assert "no run tagged method=fixed_prefix" in fixed_prefix_missing([run("o", "opd")])[0]


# ---- a small synthetic run: every artifact ---------------------------------------------------

VOCAB = ["<pad>", "<|im_end|>"] + [f"w{i} " for i in range(40)] + [f"= {i}. " for i in range(20)]


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(VOCAB[i] for i in ids)


def synthetic_batch(seed: int, with_release: bool = True, b: int = 6, t: int = 36, k: int = 8) -> RolloutBatch:
    """Rollouts whose teacher margin halves after the middle of the response."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(18, t + 1, (b,), generator=g)
    mask = mask_of(lengths.tolist(), t)
    ids = torch.randint(2, 42, (b, t), generator=g)
    seg = torch.full((b, t), -1)
    for i, n in enumerate(lengths.tolist()):
        for j in range(n):
            seg[i, j] = j // 6
            if j % 6 == 5:
                ids[i, j] = 42 + j % 20  # a sentence end
    rel = torch.arange(t)[None].float() / lengths[:, None]
    margin = torch.where(rel < 0.5, 2.0, 0.3) + 0.2 * torch.rand(b, t, generator=g)
    topk = -1.0 - 3.0 * torch.rand(b, t, k, generator=g).sort(-1).values  # descending log-probs
    topk[..., 0] = topk[..., 1] + margin
    topk = topk * mask[..., None]
    student = -2.0 * torch.rand(b, t, generator=g) * mask
    teacher = (student + torch.randn(b, t, generator=g) * (1.5 - rel).clamp(min=0.2)) * mask
    batch = RolloutBatch(
        records=[{}] * b, prompt_ids=torch.zeros(b, 2, dtype=torch.long),
        prompt_mask=torch.ones(b, 2, dtype=torch.long), response_ids=ids, response_mask=mask,
        student_logprobs=student, student_topk_ids=torch.zeros(b, t, k, dtype=torch.long),
        teacher_logprobs=teacher, teacher_topk_logprobs=topk,
        teacher_prompt_ids=torch.zeros(b, 2, dtype=torch.long), teacher_prompt_mask=torch.ones(b, 2, dtype=torch.long),
        group_ids=torch.arange(b), response_text=[""] * b,
    )
    if with_release:
        batch.segment_ids = seg
        batch.release = release_weights_batch((teacher - student) * mask, mask, topk, seg)
    return batch


def fake_run(loggers, root, method: str, with_release: bool, steps: int = 4, every: int = 2, figures=None):
    cb = DiagnosticsCallback(every_n_steps=every, case_studies=1, figures=figures)
    trainer = SimpleNamespace(global_step=0, max_steps=steps, loggers=loggers, default_root_dir=str(root),
                              datamodule=SimpleNamespace(student_tokenizer=FakeTokenizer()))
    module = SimpleNamespace(name=method, release_spec=SimpleNamespace(top_k=8, diagnose=with_release))
    for step in range(steps):
        batch = synthetic_batch(step, with_release)
        for lg in loggers:
            lg.log_metrics({
                "rollout/response_len_mean": float(batch.response_mask.sum(-1).mean()),
                "train/kept_frac": 0.8 if with_release else 1.0,
                "release/release_pos_frac": 0.7,
            }, step=step)
        trainer.global_step = step + 1
        cb.on_train_batch_end(trainer, module, {"rollouts": batch}, [], step)
    cb.on_train_end(trainer, module)
    for lg in loggers:
        lg.log_metrics({"eval/toy/accuracy": 0.4 if with_release else 0.3}, step=steps)
    assert cb.errors == []
    return cb


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An MLflow SQLite store with a release_bic run, an opd run without release decisions
    (release.diagnose=false) and two fixed-prefix runs (metrics only)."""
    from lightning.pytorch.loggers import MLFlowLogger

    tmp = tmp_path_factory.mktemp("diag")
    uri = f"sqlite:///{tmp}/mlflow.db"
    runs = {}
    for method, with_release, steps, every in (("release_bic", True, 4, 2), ("opd", False, 2, 0)):
        lg = MLFlowLogger(experiment_name="diag", tracking_uri=uri, tags={"method": method},
                          artifact_location=str(tmp / "artifacts"))
        cb = fake_run([lg], tmp / method, method, with_release, steps, every)
        lg.finalize("success")
        runs[method] = (lg.run_id, cb)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("diag")
    for length, acc in ((16, 0.2), (32, 0.35)):
        r = client.create_run(exp.experiment_id, tags={"method": "fixed_prefix"})
        client.log_param(r.info.run_id, "method.prefix_len", length)
        for step in range(3):
            client.log_metric(r.info.run_id, "train/kept_frac", length / 64, step=step)
            client.log_metric(r.info.run_id, "release/release_pos_frac", 0.4 + length / 100, step=step)
            client.log_metric(r.info.run_id, "rollout/response_len_mean", 20.0 + step, step=step)
        client.log_metric(r.info.run_id, "eval/toy/accuracy", acc, step=3)
        client.set_terminated(r.info.run_id)
    return SimpleNamespace(tmp=tmp, uri=uri, client=client, runs=runs)


PER_RUN = ("advantage_by_position", "margin_by_position", "release_stats", "response_length")


def artifact_files(client, run_id, path="diagnostics"):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(artifact_files(client, run_id, a.path) if a.is_dir else [a.path])
    return out


def test_every_artifact_is_written_for_a_synthetic_run(store):
    run_id, cb = store.runs["release_bic"]
    local = store.tmp / "release_bic" / "diagnostics"
    for name in PER_RUN:
        assert (local / f"{name}.csv").stat().st_size > 0 and (local / f"{name}.png").stat().st_size > 1000
    pages = sorted((local / "case_studies").glob("*.html"))
    steps = [int(p.name[5:11]) for p in pages]  # one per window: the best rollout of steps 1-2, 3-4
    assert len(pages) == 2 and steps[0] in (1, 2) and steps[1] in (3, 4)
    assert all(p.with_suffix(".csv").exists() for p in pages)
    remote = set(artifact_files(store.client, run_id))
    expected = {f"diagnostics/{n}.{ext}" for n in PER_RUN for ext in ("csv", "png")}
    expected |= {f"diagnostics/case_studies/{p.name}" for p in pages}
    assert expected <= remote
    assert set(store.client.get_run(run_id).data.tags["diagnostics"].split(",")) == {*PER_RUN, "case_studies"}
    # the CSVs hold one block per window (steps 1-2 and 3-4), 20 bins each
    adv = read_csv(local / "advantage_by_position.csv")
    assert [(r["step_from"], r["step"]) for r in adv[::20]] == [("1", "2"), ("3", "4")]
    assert len(adv) == 40 and all(int(r["rollouts"]) == 12 for r in adv)
    margins = read_csv(local / "margin_by_position.csv")
    assert sorted({int(r["k"]) for r in margins}) == [2, 4, 8]
    early = [float(r["margin_mean"]) for r in margins if r["k"] == "2" and int(r["bin"]) < 10]
    late = [float(r["margin_mean"]) for r in margins if r["k"] == "2" and int(r["bin"]) >= 10]
    assert min(early) > 1.9 and max(late) < 0.6  # the drop after the middle of the response
    release = read_csv(local / "release_stats.csv")
    assert len(release) == 24 and {r["step"] for r in release} == {"2", "4"}


def test_a_run_without_release_decisions_skips_those_figures_and_says_why(store):
    run_id, cb = store.runs["opd"]
    assert set(cb.skipped) == {"release_stats", "case_studies"}
    assert "release.diagnose=false" in cb.skipped["release_stats"]
    local = store.tmp / "opd" / "diagnostics"
    assert (local / "advantage_by_position.png").exists() and (local / "margin_by_position.png").exists()
    assert not (local / "release_stats.csv").exists() and not (local / "case_studies").exists()
    skipped = {r["figure"]: r["reason"] for r in read_csv(local / "skipped.csv")}
    assert set(skipped) == {"release_stats", "case_studies"}
    assert "diagnostics/skipped.csv" in artifact_files(store.client, run_id)


def test_diagnose_cli_redraws_from_mlflow_and_reports_what_is_missing(store, tmp_path, capsys):
    from opd_lit.diagnose import main

    rel_id, opd_id = store.runs["release_bic"][0], store.runs["opd"][0]
    out = tmp_path / "out"
    figures = "advantage_by_position,release_stats,case_studies,response_length,fixed_prefix_vs_release"
    assert main([f"run_id={rel_id},{opd_id}", f"tracking_uri={store.uri}", f"out={out}", f"figures={figures}"]) == 0
    text = capsys.readouterr().out
    for name in ("advantage_by_position", "release_stats"):
        assert (out / rel_id / f"{name}.png").exists() and (out / rel_id / f"{name}.csv").exists()
    assert len(list((out / rel_id / "case_studies").glob("*.html"))) == 2
    assert (out / opd_id / "advantage_by_position.png").exists()
    assert not (out / opd_id / "release_stats.png").exists()
    # the bad input: says what it needs and which runs have it; the other figures rendered
    missing = [line for line in text.splitlines() if "MISSING Figure 3" in line]
    assert len(missing) == 1 and opd_id[:12] in missing[0] and "release.diagnose=false" in missing[0]
    assert f"Runs that have it: {rel_id} (release_bic)" in missing[0]
    assert "Figure 1, steps 3-4 (12 rollouts)" in text and "acceptance rate" in text
    assert (out / "response_length.png").exists()
    assert "MISSING Figure 7" in text and "fixed_prefix: " in text  # names the fixed-prefix runs

    # the whole experiment: Figure 7 from the fixed-prefix and release runs
    out2 = tmp_path / "exp"
    assert main(["experiment=diag", f"tracking_uri={store.uri}", f"out={out2}",
                 "figures=fixed_prefix_vs_release"]) == 0
    rows = read_csv(out2 / "fixed_prefix_vs_release.csv")
    assert [r["label"] for r in rows] == ["L=16", "L=32", "release_bic"]
    assert float(rows[1]["accuracy"]) == pytest.approx(0.35) and float(rows[0]["kept_frac"]) == 0.25
    assert (out2 / "fixed_prefix_vs_release.png").exists()
    lengths = read_csv(out / "response_length.csv")  # Figure 8 across the two runs
    assert {r["method"] for r in lengths} == {"release_bic", "opd"}

    assert main(["run_id=nope", f"tracking_uri={store.uri}"]) == 2
    assert "run_id=nope: no such run" in capsys.readouterr().err


def test_csv_logger_run_writes_into_its_directory_and_redraws(tmp_path, capsys):
    from lightning.pytorch.loggers import CSVLogger

    from opd_lit.diagnose import main

    lg = CSVLogger(save_dir=str(tmp_path), name="csv")
    fake_run([lg], tmp_path / "out", "release_bic", True, steps=2, every=0, figures=["release_stats"])
    lg.save()
    run_dir = Path(lg.log_dir)
    (run_dir / "config.yaml").write_text("method:\n  name: release_bic\n")
    assert (run_dir / "diagnostics" / "release_stats.png").exists()
    assert not (tmp_path / "out" / "diagnostics").exists()
    assert main([f"run_dir={run_dir}", f"out={tmp_path / 'redrawn'}", "figures=release_stats"]) == 0
    assert (tmp_path / "redrawn" / run_dir.name / "release_stats.png").exists()
    assert "acceptance rate" in capsys.readouterr().out


def test_state_survives_a_resume(tmp_path):
    """Checkpointed state (opd_lit.checkpoint saves callback state): a resumed run's CSVs keep
    the windows drawn before the restart and the window that was open."""
    import pickle

    def trainer(step):
        return SimpleNamespace(global_step=step, max_steps=4, loggers=[], default_root_dir=str(tmp_path),
                               datamodule=SimpleNamespace(student_tokenizer=FakeTokenizer()))

    module = SimpleNamespace(name="release_bic", release_spec=SimpleNamespace(top_k=8, diagnose=True))
    figures = ["advantage_by_position", "release_stats"]
    first = DiagnosticsCallback(every_n_steps=2, figures=figures)
    for step in (1, 2, 3):  # a window drawn at step 2, step 3 still open
        first.on_train_batch_end(trainer(step), module, {"rollouts": synthetic_batch(step)}, [], step)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    second = DiagnosticsCallback(every_n_steps=2, figures=figures)
    second.load_state_dict(state)
    second.on_train_batch_end(trainer(4), module, {"rollouts": synthetic_batch(4)}, [], 3)
    adv = read_csv(tmp_path / "diagnostics" / "advantage_by_position.csv")
    assert [(r["step_from"], r["step"], r["rollouts"]) for r in adv[::20]] == [("1", "2", "12"), ("3", "4", "12")]
    assert len(read_csv(tmp_path / "diagnostics" / "release_stats.csv")) == 24


# ---- configuration -------------------------------------------------------------------------


def test_conf_default_and_the_needs_of_a_method(tmp_path):
    from e2e import compose_cfg

    from opd_lit.methods import OPD
    from opd_lit.methods.base import ReleaseSpec

    cfg = compose_cfg(tmp_path, "method=opd")
    assert cfg.diagnostics.enabled is True and list(cfg.diagnostics.margin_ks) == [2, 4, 8]
    (cb,) = diagnostics_callbacks(cfg.diagnostics)
    assert cb.every_n_steps == cfg.diagnostics.every_n_steps and cb.num_bins == 20
    assert diagnostics_callbacks(compose_cfg(tmp_path, "diagnostics.enabled=false").diagnostics) == []

    from opd_lit.methods.base import LossSpec

    module = OPD.__new__(OPD)  # the needs only read the specs (no student is loaded)
    object.__setattr__(module, "release_spec", ReleaseSpec(diagnose=False))
    object.__setattr__(module, "loss_spec", LossSpec())
    assert module.step_needs().topk == 0
    merged = module.step_needs([cb])  # the step merges the diagnostics' needs at set-up
    assert merged.topk == 8 and not merged.segments and module.needs.topk == 0  # nothing mutated
    object.__setattr__(module, "release_spec", ReleaseSpec(top_k=16, diagnose=True))
    assert module.step_needs([cb]).topk == 16 and module.step_needs().release


@pytest.mark.parametrize("kwargs, match", [
    ({"margin_ks": [1, 4]}, "margin_ks"),
    ({"normalize": "median"}, "normalize"),
    ({"every_n_steps": -1}, "every_n_steps"),
    ({"figures": ["figure_9"]}, "figure_9"),
])
def test_bad_diagnostics_config_is_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiagnosticsCallback(**kwargs)
