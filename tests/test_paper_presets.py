"""The paper presets carry the settings of the papers and of G-OPD where the paper defers to it
(issue 16): learning rate, the DeepMath-103K level-6 subset, the evaluated columns, the
Student/Teacher evaluations and the evaluation sampling. No model is loaded."""

from __future__ import annotations

import pytest
from e2e import REPO, compose_cfg

from opd_lit.data.prompts import DataConfigError, PromptSpec, file_records

PAPER_PRESETS = ["paper_1p7b", "paper_4b", "paper_8b"]
TABLE_COLUMNS = ["aime25", "hmmt25_feb", "hmmt25_nov", "math500", "minerva", "gpqa_diamond"]


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_math_presets_carry_g_opds_training_settings(tmp_path, preset):
    cfg = compose_cfg(tmp_path, f"experiment={preset}", fast=False)
    assert cfg.optim.lr == 1.0e-5 and cfg.optim.warmup_steps == 0 and cfg.optim.schedule == "constant"
    assert cfg.rollout.prompts_per_step == 1024 and cfg.rollout.samples_per_prompt == 1
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0
    assert cfg.data.prompt_field == "question" and cfg.data.min_difficulty == 6
    assert cfg.data.difficulty_field == "difficulty"
    exopd = compose_cfg(tmp_path, f"experiment={preset}", "method=exopd", fast=False).method
    assert exopd.lam == 1.25 and exopd.reference == "student_init"


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_math_presets_evaluate_every_column_at_the_start_and_the_end(tmp_path, preset):
    ev = compose_cfg(tmp_path, f"experiment={preset}", fast=False).eval
    assert list(ev.benchmarks) == TABLE_COLUMNS
    assert ev.at_start and ev.at_end and not ev.teacher_at_start  # the teacher: once per sweep
    assert ev.max_new_tokens == 32768


@pytest.mark.parametrize("preset", [*PAPER_PRESETS, "paper_code"])
def test_presets_sample_the_evaluation_with_qwen3_non_thinking_values(tmp_path, preset, monkeypatch):
    monkeypatch.setenv("OPD_EVAL_DIR", str(REPO / "tests" / "fixtures" / "eval"))
    from opd_lit.eval.harness import Evaluator

    cfg = compose_cfg(tmp_path, f"experiment={preset}", fast=False)
    assert cfg.student.template_kwargs.enable_thinking is False  # the mode the values are for
    evaluator = Evaluator(dict(cfg.eval))
    for spec in evaluator.config.selected:
        params = evaluator.sampling_params(spec)
        assert (params.temperature, params.top_p) == (0.7, 0.8), spec.name


def test_code_preset_keeps_every_prompt(tmp_path):
    cfg = compose_cfg(tmp_path, "experiment=paper_code", fast=False)
    assert cfg.data.get("min_difficulty") is None and list(cfg.eval.benchmarks) == ["livecodebench_v6", "mbpp", "humaneval"]


def _deepmath_copy(tmp_path):
    """A parquet file with DeepMath-103K's public columns."""
    import datasets

    rows = {
        "question": [f"Problem {i}" for i in range(6)],
        "final_answer": [str(i) for i in range(6)],
        "difficulty": [5.0, 5.5, 6.0, 6.5, 7.0, 9.0],
        "topic": ["Mathematics -> Algebra"] * 6,
        "r1_solution_1": ["..."] * 6, "r1_solution_2": ["..."] * 6, "r1_solution_3": ["..."] * 6,
    }
    path = tmp_path / "DeepMath-103K"
    path.mkdir()
    datasets.Dataset.from_dict(rows).to_parquet(str(path / "train-00000.parquet"))
    return str(path)


def test_min_difficulty_keeps_the_level6_subset(tmp_path):
    path = _deepmath_copy(tmp_path)
    every = file_records(PromptSpec(source="file", path=path))
    assert [r["answer"] for r in every] == ["0", "1", "2", "3", "4", "5"]
    hard = file_records(PromptSpec(source="file", path=path, min_difficulty=6))
    assert [r["answer"] for r in hard] == ["2", "3", "4", "5"]
    assert [r["answer"] for r in file_records(PromptSpec(source="file", path=path, min_difficulty=6, limit=2))] == ["2", "3"]


def test_min_difficulty_bad_input_names_the_key(tmp_path):
    path = _deepmath_copy(tmp_path)
    with pytest.raises(DataConfigError, match=r"data\.difficulty_field='level', which is not a column.*columns: \[.*'difficulty'"):
        file_records(PromptSpec(source="file", path=path, min_difficulty=6, difficulty_field="level"))
    with pytest.raises(DataConfigError, match=r"data\.min_difficulty=10: no row"):
        file_records(PromptSpec(source="file", path=path, min_difficulty=10))
    with pytest.raises(DataConfigError, match=r"data\.min_difficulty='hard': allowed is null"):
        file_records(PromptSpec(source="file", path=path, min_difficulty="hard"))
