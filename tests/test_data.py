import pytest

from opd_lit.batch import left_pad, right_pad
from opd_lit.data import StepBatchSampler


def test_step_sampler_is_deterministic_and_resumable():
    full = list(StepBatchSampler(10, 4, 7, seed=3))
    assert len(full) == 7 and all(len(b) == 4 for b in full)
    assert full == list(StepBatchSampler(10, 4, 7, seed=3))
    assert list(StepBatchSampler(10, 4, 7, seed=3, start_step=4)) == full[4:]
    assert full != list(StepBatchSampler(10, 4, 7, seed=4))
    # every pass over the data visits each prompt once
    flat = [i for b in full for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_step_sampler_batch_larger_than_dataset():
    batches = list(StepBatchSampler(3, 5, 2, seed=0))
    assert [len(b) for b in batches] == [5, 5]


def test_step_sampler_rejects_empty():
    with pytest.raises(ValueError):
        StepBatchSampler(0, 2, 1, seed=0)


def test_padding_layout():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    ids, mask = right_pad([[1, 2], []], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 0]] and mask.tolist() == [[1.0, 1.0], [0.0, 0.0]]


def test_vllm_context_fits_the_longer_of_training_and_evaluation_budgets(tmp_path, monkeypatch):
    """rollout=vllm sizes max_model_len for the in-training evaluation's budget too (the paper
    presets train at 16k new tokens and evaluate at 32k on the same engine)."""
    from e2e import compose_cfg

    from opd_lit.train import build

    def engine_options(*overrides):
        cfg = compose_cfg(tmp_path, "rollout=vllm", "rollout.max_new_tokens=96",
                          "rollout.max_prompt_tokens=64", *overrides)
        dm, _, _ = build(cfg, tmp_path / "run")
        dm.prepare_tokenizers()
        return {**dm.engine_options(), "name": dm.spec.engine}  # what build_engine is given

    assert engine_options("eval.toy.max_new_tokens=500")["max_model_len"] == 64 + 500
    assert engine_options("eval.max_new_tokens=40")["max_model_len"] == 64 + 96
    none = engine_options("eval.at_start=false", "eval.at_end=false", "eval.toy.max_new_tokens=500")
    assert none["max_model_len"] == 64 + 96 and none["name"] == "vllm"
