"""Every sweep composes, validates and has the expected number of jobs (dry run, no models)."""

import re

import pytest
from e2e import REPO, run_module

from opd_lit.sweep import UnknownSweepError, available_sweeps, check_sweep_name, main

EXPECTED_JOBS = {
    "table1": 8 * 3,  # 8 methods x 3 seeds
    "table2": 5 * 3,  # adv_std + 4 support sizes, x 3 seeds
    "table3": 2 * 4 * 3,  # 2 students x 4 methods x 3 seeds
    "table5": 3 * 3,
    "toy_table1": 8 * 3,
    "toy_smoke": 2 * 2,
}


def test_every_sweep_has_an_expected_count():
    assert sorted(EXPECTED_JOBS) == available_sweeps()


@pytest.mark.parametrize("name", sorted(EXPECTED_JOBS))
def test_sweep_dry_run_composes_every_job(tmp_path, name):
    proc = run_module(
        "opd_lit.train", "-m", "--config-dir", str(REPO / "sweeps"), "--config-name", name,
        "dry_run=true", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [line for line in proc.stdout.splitlines() if re.match(r"job +\d+ ", line)]
    assert len(jobs) == EXPECTED_JOBS[name], proc.stdout
    # each job is distinct (method/label/student/seed)
    keys = {re.sub(r"^job +\d+ +", "", j) for j in jobs}
    assert len(keys) == len(jobs)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "mlflow.db").exists()


def test_table1_jobs_carry_the_paper_setting(tmp_path):
    proc = run_module(
        "opd_lit.train", "--config-dir", str(REPO / "sweeps"), "--config-name", "table1",
        "method=opd", "seed=0", "--cfg", "job", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "max_new_tokens: 16384" in out and "prompts_per_step: 1024" in out
    assert "max_steps: 100" in out and "Qwen3-30B-A3B-Instruct-2507" in out


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
