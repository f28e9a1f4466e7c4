"""Every sweep composes, validates and has the expected number of jobs (dry run, no models)."""

import re

import pytest
from e2e import REPO, run_module

from opd_lit.report import load_paper, row_label
from opd_lit.sweep import (
    STUDENT_ROW,
    TEACHER_ROW,
    UnknownSweepError,
    available_sweeps,
    check_sweep_name,
    main,
)

EXPECTED_JOBS = {
    "table1": 8 * 3,  # 8 methods x 3 seeds
    "table2": 4 * 3,  # adv_std + support sizes 4, 16, 32 (K = 8 and OPD are table1's runs), x 3 seeds
    "table3": 2 * 4 * 3,  # 2 students x 4 methods x 3 seeds
    "table5": 3 * 3,
    "toy_table1": 8 * 3,
    "toy_smoke": 2 * 2,
    "lgr": 5 * 3,  # OPD, OPD (topk) renormalised / not, LGR, LGR (topk), x 3 seeds
}


def test_every_sweep_has_an_expected_count():
    assert sorted(EXPECTED_JOBS) == available_sweeps()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``name -> stdout`` of the sweep's dry run, each run once for the module."""
    done: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in done:
            tmp = tmp_path_factory.mktemp(f"dry-{name}")
            proc = run_module(
                "opd_lit.train", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name", name,
                "dry_run=true", f"hydra.sweep.dir={tmp}", cwd=tmp, timeout=300,
            )
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert not list(tmp.rglob("*.ckpt")) and not (tmp / "mlflow.db").exists()
            done[name] = proc.stdout
        return done[name]

    return get


def job_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"job +\d+ ", line)]


@pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
def test_sweep_dry_run_composes_every_job(dry_run, name):
    out = dry_run(name)
    jobs = job_lines(out)
    assert len(jobs) == EXPECTED_JOBS[name], out
    # each job is distinct (method/label/student/seed)
    keys = {re.sub(r"^job +\d+ +", "", j) for j in jobs}
    assert len(keys) == len(jobs)


JOB = re.compile(r"student=(?P<student>\S+) .* rows=(?P<rows>.*?) eval=(?P<eval>\S+)")


def produced_cells(stdout: str) -> set[tuple[str, str]]:
    """(report row, benchmark) for every job of a dry run, named as the report names them."""
    jobs = [JOB.search(line).groupdict() for line in job_lines(stdout)]
    multi = len({j["student"] for j in jobs}) > 1
    cells = set()
    for j in jobs:
        for row in j["rows"].split("|"):
            if row == "-":
                continue
            name = row if row == TEACHER_ROW else row_label(row, j["student"], multi)
            cells.update((name, bench) for bench in j["eval"].split(","))
    return cells


def test_the_dry_runs_of_tables_1_to_3_produce_every_cell_of_the_paper(dry_run):
    """Every (row, column) of the paper's Tables 1-3 is measured by some job of the three
    sweeps (Avg is the mean of the five math columns; borrowed rows come from their sweep)."""
    paper = load_paper()
    produced = {name: produced_cells(dry_run(name)) for name in ("table1", "table2", "table3")}
    for name in produced:
        table = paper["tables"][name]
        borrow = table.get("borrow") or {}
        for row in table["rows"]:
            sweep, label = (borrow[row]["sweep"], borrow[row]["label"]) if row in borrow else (name, row)
            for bench in paper["benchmarks"]:  # the five math benchmarks and GPQA
                assert (label, bench) in produced[sweep], f"{name}: no job measures {row} on {bench}"
    # the 30B teacher is evaluated once per sweep; the student at step 0 by every job
    for name in ("table1", "table3"):
        lines = job_lines(dry_run(name))
        assert sum(f"|{TEACHER_ROW}" in line for line in lines) == 1, name
        assert all(f"|{STUDENT_ROW}" in line for line in lines), name
    assert not any(STUDENT_ROW in line or TEACHER_ROW in line for line in job_lines(dry_run("table2")))


def test_table1_jobs_carry_the_paper_setting(tmp_path):
    proc = run_module(
        "opd_lit.train", "--config-dir", str(REPO / "sweeps"), "--config-name", "table1",
        "method=opd", "seed=0", "--cfg", "job", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "max_new_tokens: 16384" in out and "prompts_per_step: 1024" in out
    assert "max_steps: 100" in out and "Qwen3-30B-A3B-Instruct-2507" in out
    # issue 16: G-OPD's lr and data subset, every column, the step-0 evaluation, the sampling
    assert "lr: 1.0e-05" in out and "min_difficulty: 6" in out
    assert "- gpqa_diamond" in out and "at_start: true" in out
    assert "temperature: 0.7" in out and "top_p: 0.8" in out
    assert "teacher_eval_job:" in out


def test_unknown_sweep_lists_the_sweeps(capsys):
    with pytest.raises(UnknownSweepError) as err:
        check_sweep_name("tabel1")
    assert "table1" in str(err.value) and "toy_table1" in str(err.value)
    assert main(["tabel1"]) == 2
    assert "available sweeps" in capsys.readouterr().err


def _leaves(node, prefix=""):
    """(dotted key, value) for every leaf of a plain dict; lists are leaves."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name", ["paper_1p7b", "paper_4b", "paper_8b", "paper_code", "toy"])
def test_an_experiment_preset_wins_over_the_base_config(tmp_path, name):
    """Every key a preset sets (its own body, and the bodies of the presets it extends) is
    what the composed run gets: conf/config.yaml must not silently put its toy values back
    (e.g. optim.lr 1e-4 over the paper's 1e-6)."""
    import yaml
    from e2e import compose_cfg
    from omegaconf import OmegaConf

    def body(preset):
        data = yaml.safe_load((REPO / "conf" / "experiment" / f"{preset}.yaml").read_text())
        parents = [d for d in data.get("defaults", []) if isinstance(d, str) and d != "_self_"]
        merged = {}
        for parent in parents:
            merged.update(dict(_leaves(body(parent))))
        merged.update(dict(_leaves({k: v for k, v in data.items() if k != "defaults"})))
        return merged

    cfg = OmegaConf.to_container(compose_cfg(tmp_path, f"experiment={name}", fast=False), resolve=False)
    expected = body(name)
    assert expected, name
    for key, value in expected.items():
        got = cfg
        for part in key.split("."):
            got = got[part]
        assert got == value, f"{name}: {key} = {got!r}, the preset says {value!r}"


def test_the_lgr_sweep_compares_opd_its_topk_forms_and_lgr_on_the_7b_setting(dry_run, tmp_path):
    from e2e import compose_cfg

    jobs = job_lines(dry_run("lgr"))
    labels = sorted({re.search(r"label='([^']*)'", j).group(1) for j in jobs})
    assert labels == ["LGR", "LGR (topk)", "OPD", "OPD (topk)", "OPD (topk, unnormalised)"]
    assert sum("Teacher" in j for j in jobs) == 1  # the teacher evaluated once per sweep
    assert all("DeepSeek-R1-Distill-Qwen-7B" in j and "aime24" in j and "aime26" in j for j in jobs)
    cfg = compose_cfg(tmp_path, "experiment=paper_lgr_7b", fast=False)
    assert cfg.rollout.max_new_tokens == 39936 and cfg.eval.samples == 8
    assert cfg.trainer.strategy.shard_teacher and cfg.trainer.devices == 8
