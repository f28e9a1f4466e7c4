import torch
from conftest import random_rollout, tiny_qwen3

from opd_lit.batch import join_prompt_response
from opd_lit.scoring import score_tokens, score_tokens_full


def _inputs(seed=0, batch=5, prompt=7, resp=11, vocab=67):
    p, pm, r, rm = random_rollout(batch, prompt, resp, vocab, seed=seed)
    ids, am = join_prompt_response(p, pm, r, rm)
    return ids, am, r, rm


def test_chunked_equals_full_logits():
    model = tiny_qwen3()
    for seed in range(3):
        ids, am, r, rm = _inputs(seed)
        gather = torch.randint(0, 67, (*r.shape, 4))
        full = score_tokens_full(model, ids, am, r, rm, gather_ids=gather)
        for chunk in (1, 3, 1000):
            ch = score_tokens(model, ids, am, r, rm, gather_ids=gather, chunk_size=chunk)
            torch.testing.assert_close(ch.logprobs, full.logprobs, atol=1e-5, rtol=0)
            torch.testing.assert_close(ch.topk_logprobs, full.topk_logprobs, atol=1e-5, rtol=0)


def test_padding_positions_are_zero_and_left_padding_is_invisible():
    model = tiny_qwen3()
    ids, am, r, rm = _inputs(1)
    s = score_tokens(model, ids, am, r, rm, topk=3, entropy=True)
    assert torch.all(s.logprobs[rm == 0] == 0)
    assert torch.all(s.entropy[rm == 0] == 0)
    # Row 0 alone, without the batch's extra left padding, scores the same.
    width = int(am[0, : ids.shape[1] - r.shape[1]].sum())
    alone = score_tokens(model, ids[:1, ids.shape[1] - r.shape[1] - width:], am[:1, ids.shape[1] - r.shape[1] - width:], r[:1], rm[:1])
    torch.testing.assert_close(alone.logprobs, s.logprobs[:1], atol=1e-5, rtol=0)


def test_own_topk_and_entropy_match_full_distribution():
    model = tiny_qwen3()
    ids, am, r, rm = _inputs(2)
    s = score_tokens(model, ids, am, r, rm, topk=5, entropy=True, chunk_size=4)
    out = model(input_ids=ids, attention_mask=am,
                position_ids=(am.cumsum(-1) - 1).clamp(min=0))
    P = ids.shape[1] - r.shape[1]
    logp = out.logits[:, P - 1: P - 1 + r.shape[1]].float().log_softmax(-1)
    top_lp, top_ids = logp.topk(5, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    valid = rm > 0
    assert torch.equal(s.topk_ids[valid], top_ids[valid])
    torch.testing.assert_close(s.topk_logprobs[valid], top_lp[valid], atol=1e-5, rtol=0)
    torch.testing.assert_close(s.entropy[valid], ent[valid], atol=1e-5, rtol=0)


def test_gradients_through_checkpointed_chunks_equal_full():
    ids, am, r, rm = _inputs(3)
    coef = torch.randn(r.shape)
    grads = []
    for chunked in (True, False):
        model = tiny_qwen3(seed=7).train()
        if chunked:
            lp = score_tokens(model, ids, am, r, rm, chunk_size=5).logprobs
        else:
            lp = score_tokens_full(model, ids, am, r, rm).logprobs
        (coef * lp).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_empty_responses_give_zeros_not_nan():
    model = tiny_qwen3()
    ids, am, r, rm = _inputs(4)
    rm = torch.zeros_like(rm)
    am = am.clone()
    am[:, -r.shape[1]:] = 0
    s = score_tokens(model, ids, am, r, rm, topk=3, entropy=True)
    assert torch.all(s.logprobs == 0) and torch.all(s.entropy == 0)
    assert not torch.isnan(s.topk_logprobs).any()
