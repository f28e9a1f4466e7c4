"""LGR's teacher lookahead: tree attention over one cached prefill equals separate forwards."""

import pytest
import torch
from conftest import random_rollout, tiny_qwen3

from opd_lit.batch import join_prompt_response
from opd_lit.lookahead import (
    PrefillCapture,
    check_attention,
    entropy_trigger,
    expected_group_reward_loss,
    group_normalise,
    lookahead_max_prob,
    lookahead_max_prob_reference,
    sampled_candidate_reward,
    split_positions,
    tree_branch_inputs,
)
from opd_lit.scoring import score_tokens

VOCAB = 67


def _setup(seed=0, batch=3, prompt=5, resp=8, k=4, frac=0.5, layers=2):
    model = tiny_qwen3(vocab=VOCAB, layers=layers, seed=seed)
    p, pm, r, rm = random_rollout(batch, prompt, resp, VOCAB, seed=seed + 1)
    ids, am = join_prompt_response(p, pm, r, rm)
    g = torch.Generator().manual_seed(seed + 2)
    trig = (torch.rand(r.shape, generator=g) < frac) & (rm > 0)
    cand = torch.stack([torch.randperm(VOCAB - 1, generator=g)[:k] + 1 for _ in range(r.numel())])
    return model, ids, am, r, rm, trig, cand.view(*r.shape, k)


@pytest.mark.parametrize("segments", [1, 3, 8])
def test_tree_attention_equals_k_separate_forwards(segments):
    model, ids, am, r, rm, trig, cand = _setup(seed=segments)
    cap = PrefillCapture(model)
    with torch.no_grad():
        score_tokens(cap, ids, am, r, rm)
    r_tree, calls = lookahead_max_prob(model, cap.cache, am, trig, cand, segments=segments, chunk_size=7)
    r_ref = lookahead_max_prob_reference(model, ids, am, trig, cand)
    assert trig.any()
    assert torch.allclose(r_tree, r_ref, atol=1e-4, rtol=0)
    assert (r_tree[~trig] == 0).all() and (r_tree[trig] > 0).all()
    most = max(int(row.sum()) for row in trig)
    assert calls == min(segments, most)
    assert cap.cache.get_seq_length() == ids.shape[1]  # the cache is restored after every forward


def test_tree_attention_with_eager_attention():
    model, ids, am, r, rm, trig, cand = _setup(seed=7)
    model.config._attn_implementation = "eager"
    cap = PrefillCapture(model)
    with torch.no_grad():
        score_tokens(cap, ids, am, r, rm)
    r_tree, _ = lookahead_max_prob(model, cap.cache, am, trig, cand, segments=2)
    assert torch.allclose(r_tree, lookahead_max_prob_reference(model, ids, am, trig, cand), atol=1e-4)


def test_attention_without_custom_masks_is_rejected():
    model = tiny_qwen3()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match=r"teacher\.attn_implementation='flash_attention_2'.*sdpa"):
        check_attention(model)


def test_tree_attention_in_bfloat16_is_close():
    model, ids, am, r, rm, trig, cand = _setup(seed=11)
    model = model.to(torch.bfloat16)
    cap = PrefillCapture(model)
    with torch.no_grad():
        score_tokens(cap, ids, am, r, rm)
    r_tree, _ = lookahead_max_prob(model, cap.cache, am, trig, cand, segments=2)
    r_ref = lookahead_max_prob_reference(model, ids, am, trig, cand)
    assert torch.allclose(r_tree, r_ref, atol=2e-2)


def test_prefill_capture_scores_exactly_like_the_model():
    model, ids, am, r, rm, _, cand = _setup(seed=4)
    with torch.no_grad():
        plain = score_tokens(model, ids, am, r, rm, gather_ids=cand)
        cap = PrefillCapture(model)
        kept = score_tokens(cap, ids, am, r, rm, gather_ids=cand)
    assert torch.equal(plain.logprobs, kept.logprobs)
    assert torch.equal(plain.topk_logprobs, kept.topk_logprobs)
    assert cap.cache.get_seq_length() == ids.shape[1]


def test_branch_tokens_see_their_prefix_and_themselves_only():
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # prompt width 2, response width 4
    cand = torch.arange(2 * 4 * 2).view(2, 4, 2) + 1
    positions = [torch.tensor([0, 3]), torch.tensor([1])]
    ids, pos, mask, valid = tree_branch_inputs(positions, cand, am, 4, torch.float32)
    assert ids.shape == (2, 4) and mask.shape == (2, 1, 4, 10)
    allowed = mask[:, 0] == 0  # [B, M, L+M]
    as_bool = tree_branch_inputs(positions, cand, am, 4, torch.bool)[2]
    assert as_bool.dtype == torch.bool and torch.equal(as_bool[:, 0], allowed)
    # row 0, y_0's branches: the one real prompt token (column 1) and themselves
    assert allowed[0, 0].nonzero().flatten().tolist() == [1, 6]
    assert allowed[0, 1].nonzero().flatten().tolist() == [1, 7]
    # row 0, y_3's branches: prompt + y_0..y_2 (columns 1..4), not the siblings
    assert allowed[0, 2].nonzero().flatten().tolist() == [1, 2, 3, 4, 8]
    assert pos[0].tolist() == [1, 1, 4, 4]  # one real prompt token: y_t sits at position 1 + t
    assert pos[1, :2].tolist() == [3, 3] and valid[1].tolist() == [True, True, False, False]
    assert ids[0].tolist() == [cand[0, 0, 0], cand[0, 0, 1], cand[0, 3, 0], cand[0, 3, 1]]
    # padding slots attend to themselves only (no fully masked row, no NaN)
    assert allowed[1, 2].nonzero().flatten().tolist() == [8]


def test_split_positions_covers_every_trigger_once():
    trig = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    groups = split_positions(trig, 3)
    assert len(groups) == 3
    row0 = torch.cat([g[0] for g in groups]).tolist()
    assert row0 == [0, 1, 3, 4, 5] and max(g[0].numel() for g in groups) == 2
    assert torch.cat([g[1] for g in groups]).tolist() == [5]


def test_entropy_trigger_is_strict_and_masked():
    ent = torch.tensor([[0.1, 0.2, 0.3, 0.9]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert entropy_trigger(ent, mask, 0.2).tolist() == [[False, False, True, False]]


def test_group_normalisation():
    r = torch.tensor([[0.1, 0.5, 0.9, 0.5], [0.3, 0.3, 0.3, 0.3]])
    z = group_normalise(r)
    assert torch.allclose(z[0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(z[0].std(unbiased=False), torch.tensor(1.0), atol=1e-4)
    assert (z[1] == 0).all()  # no spread: no reward
    # invariant to affine maps of r_raw (scale > 0)
    assert torch.allclose(group_normalise(3 * r[:1] + 2), z[:1], atol=1e-4)


def test_sampled_candidate_reward_picks_y_t_among_the_candidates():
    r_conf = torch.tensor([[[1.0, -1.0, 0.5], [2.0, 0.0, -2.0], [0.3, 0.2, 0.1]]])
    cand = torch.tensor([[[5, 6, 7], [5, 6, 7], [5, 6, 7]]])
    resp = torch.tensor([[6, 9, 7]])  # y_1 = 9 is not a candidate
    trig = torch.tensor([[True, True, False]])  # position 2 is not triggered
    reward, hit = sampled_candidate_reward(r_conf, cand, resp, trig)
    assert reward.tolist() == [[-1.0, 0.0, 0.0]]
    assert hit.tolist() == [[True, False, False]]


def test_expected_group_reward_loss_gradient():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    cand_logp = logits.log_softmax(-1) - 0.7  # any per-row shift: π̄ renormalises it away
    reward = torch.randn(2, 3, 4)
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = expected_group_reward_loss(cand_logp, reward, weight, 3.0)
    loss.backward()
    p = logits.detach().softmax(-1)
    expected = -(weight * (p * reward).sum(-1)).sum() / 3
    assert torch.allclose(loss, expected, atol=1e-6)
    # d/dz_j Σ_k p_k R_k = p_j (R_j − Σ_k p_k R_k)
    grad = -weight.unsqueeze(-1) * p * (reward - (p * reward).sum(-1, keepdim=True)) / 3
    assert torch.allclose(logits.grad, grad, atol=1e-6)
