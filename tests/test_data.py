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
