"""Bad input gets a clear error naming the bad key or value and what is allowed."""

import pytest
import torch
from e2e import compose_cfg
from hydra.errors import MissingConfigException

from opd_lit.methods import ReleaseBIC
from opd_lit.models import ModelPathError, check_same_vocabulary, load_tokenizer, resolve_model_path
from opd_lit.train import run


def test_unknown_method_lists_the_available_ones(tmp_path):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(tmp_path, "method=nope")
    msg = str(err.value)
    assert "method/nope" in msg and "opd" in msg and "release_bic" in msg


def test_missing_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelPathError, match="no-such-model"):
        resolve_model_path(missing, "student.path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match="config.json"):
        resolve_model_path(tmp_path / "empty", "teacher.path")
    # Through the entry point, the start-up validator names the key and the path.
    cfg = compose_cfg(tmp_path, f"student.path={missing}")
    with pytest.raises(Exception) as err:
        run(cfg)
    assert "student.path" in str(err.value) and "no-such-model" in str(err.value)


def test_vocabulary_mismatch_names_both_sizes():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    student = load_tokenizer("toy:student")
    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    with pytest.raises(ValueError) as err:
        check_same_vocabulary(student, other)
    assert str(len(student)) in str(err.value) and "has 3 tokens" in str(err.value)


def test_top_k_below_two_is_rejected():
    with pytest.raises(ValueError, match=r"release.top_k=1.*>= 2"):
        ReleaseBIC(release={"top_k": 1})


def test_unknown_keys_and_values_are_named():
    with pytest.raises(ValueError, match=r"release: unknown key\(s\) \['topk'\]"):
        ReleaseBIC(release={"topk": 4})
    with pytest.raises(ValueError, match=r"release.signal='variance'.*margin.*adv_std"):
        ReleaseBIC(release={"signal": "variance"})


def test_empty_response_gets_zero_weight_and_no_nan():
    from opd_lit.release import release_weights_batch

    B, T, K = 3, 6, 4
    adv = torch.randn(B, T)
    mask = torch.ones(B, T)
    mask[1] = 0  # empty response
    seg = torch.tensor([[0, 0, 1, 1, 2, 2], [-1] * 6, [0, 0, 0, 1, 1, 1]])
    topk = torch.randn(B, T, K).log_softmax(-1)
    rel = release_weights_batch(adv, mask, topk, seg)
    assert torch.all(rel.weight[1] == 0)
    assert torch.isfinite(rel.weight).all() and torch.isfinite(rel.scale).all()


def test_response_without_sentence_boundary_is_fully_supervised():
    from opd_lit.release import release_weights_batch, segment_ids_batch

    tok = load_tokenizer("toy:student")
    ids = tok("First 3 plus 4 makes 7 and then we add 2 to get 9 so it is 9", add_special_tokens=False)["input_ids"]
    resp = torch.tensor([ids])
    mask = torch.ones_like(resp, dtype=torch.float32)
    seg = segment_ids_batch(tok, resp, mask)
    assert set(seg[0].tolist()) == {0}
    rel = release_weights_batch(torch.randn(1, len(ids)), mask, torch.randn(1, len(ids), 8).log_softmax(-1), seg)
    assert not bool(rel.accepted[0])
    torch.testing.assert_close(rel.weight, mask)
