import torch
from conftest import random_rollout, tiny_qwen3

from opd_lit.batch import join_prompt_response
from opd_lit.objectives import masked_mean, opd_advantage, policy_gradient_loss
from opd_lit.scoring import score_tokens


def test_student_equal_teacher_gives_zero_advantage_and_zero_loss():
    model = tiny_qwen3(seed=3).train()
    p, pm, r, rm = random_rollout(4, 6, 9, 67, seed=5)
    ids, am = join_prompt_response(p, pm, r, rm)
    with torch.no_grad():
        teacher = score_tokens(model, ids, am, r, rm).logprobs
    student = score_tokens(model, ids, am, r, rm)
    adv = opd_advantage(teacher, student.logprobs, rm)
    assert adv.abs().max() < 1e-6
    loss = policy_gradient_loss(student.logprobs, adv, rm, rm.sum())
    loss.backward()
    assert abs(float(loss)) < 1e-6
    assert max(p.grad.abs().max() for p in model.parameters() if p.grad is not None) < 1e-6


def test_advantage_sign_and_mask():
    t = torch.tensor([[-1.0, -2.0, -3.0]])
    s = torch.tensor([[-2.0, -2.0, -1.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert opd_advantage(t, s, m).tolist() == [[1.0, 0.0, 0.0]]


def test_micro_batches_add_up_to_full_batch_loss():
    logp = torch.randn(6, 5, requires_grad=True)
    adv, w = torch.randn(6, 5), torch.rand(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    n = mask.sum()
    full = policy_gradient_loss(logp * mask, adv * mask, w, n)
    parts = sum(policy_gradient_loss(logp[i:i + 2] * mask[i:i + 2], adv[i:i + 2] * mask[i:i + 2], w[i:i + 2], n) for i in range(0, 6, 2))
    torch.testing.assert_close(full, parts)
    # the gradient w.r.t. log-probs is -w*A/N, with A and w held constant
    full.backward()
    torch.testing.assert_close(logp.grad, -(w * adv * mask) * mask / n)


def test_masked_mean_empty_is_zero():
    assert float(masked_mean(torch.ones(2, 3), torch.zeros(2, 3))) == 0.0
