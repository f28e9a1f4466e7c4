"""The hf engine's own decoding loop: the same tokens as transformers ``generate`` (greedy),
the student's scores from generation equal to the second scoring pass, the same step loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_qwen3

from opd_lit.batch import left_pad, right_pad
from opd_lit.rollout import HFEngine, SamplingParams
from opd_lit.rollout.decode import draw, sampling_logits
from opd_lit.scoring import score_tokens
from opd_lit.step import pad_topk, right_pad_float

EOS = 3
PAD = 0


def prompts(n=6, vocab=67, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 9, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lens]


def second_pass(model, ps, gen, k):
    """The reference: one no-grad student forward over [prompt | response] (score_tokens)."""
    p_ids, p_mask = left_pad([p for p in ps for _ in range(len(gen.response_ids) // len(ps))], PAD)
    r_ids, r_mask = right_pad(gen.response_ids, PAD)
    with torch.no_grad():
        ref = score_tokens(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.long()], 1),
                           r_ids, r_mask, topk=k, entropy=True)
    return ref, r_ids.shape, r_mask > 0


def test_greedy_loop_gives_generates_tokens():
    model = tiny_qwen3()
    ps = prompts()
    params = SamplingParams(max_new_tokens=20, greedy=True)
    ref = HFEngine(model, PAD, [EOS], decoder="generate").generate(ps, 1, params)
    got = HFEngine(model, PAD, [EOS], decoder="loop").generate(ps, 1, params)
    assert got.response_ids == ref.response_ids
    assert any(r[-1] == EOS for r in got.response_ids) or all(len(r) == 20 for r in got.response_ids)
    assert ref.logprobs is None and got.logprobs is None  # nothing asked for, nothing computed
    # greedy with several samples (generate refuses it): identical, adjacent samples
    two = HFEngine(model, PAD, [EOS], decoder="loop").generate(ps, 2, params).response_ids
    assert two[0::2] == got.response_ids and two[1::2] == got.response_ids


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=24, temperature=0.7, top_p=0.9, top_k=20, logprobs=5, entropy=True),
    SamplingParams(max_new_tokens=24, greedy=True, logprobs=5, entropy=True),
])
def test_scores_from_generation_equal_the_second_pass(params):
    """Log-probs, top-K ids and entropy of the raw distribution (temperature 1, whatever the
    sampling settings), fp32, against score_tokens on the same tokens."""
    model = tiny_qwen3(vocab=67)
    ps = prompts(vocab=67)
    torch.manual_seed(1)
    gen = HFEngine(model, PAD, [EOS], decoder="loop").generate(ps, 2, params)
    ref, shape, valid = second_pass(model, ps, gen, 5)
    assert valid.sum() > 20
    lp = right_pad_float(gen.logprobs, shape)
    assert torch.allclose(lp[valid], ref.logprobs[valid], atol=1e-4)
    ent = right_pad_float(gen.entropy, shape)
    assert torch.allclose(ent[valid], ref.entropy[valid], atol=1e-4)
    top = pad_topk(gen.topk_ids, shape, 5)
    assert (top == ref.topk_ids)[valid].float().mean() > 0.99
    # where ids differ (near ties), the reference gives generation's ids the same log-probs
    p_ids, p_mask = left_pad([p for p in ps for _ in range(2)], PAD)
    r_ids, r_mask = right_pad(gen.response_ids, PAD)
    with torch.no_grad():
        at = score_tokens(model, torch.cat([p_ids, r_ids], 1), torch.cat([p_mask, r_mask.long()], 1),
                          r_ids, r_mask, gather_ids=top)
    assert torch.allclose(at.topk_logprobs[valid], ref.topk_logprobs[valid], atol=1e-4)


def test_sampling_logits_truncations():
    # probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits)
    logits = torch.tensor([[math.log(0.5), math.log(0.25), math.log(0.125), math.log(0.125)]])
    keep = lambda p: torch.isfinite(sampling_logits(logits, p))[0].tolist()  # noqa: E731
    assert keep(SamplingParams(top_p=0.5)) == [True, False, False, False]
    assert keep(SamplingParams(top_p=0.6)) == [True, True, False, False]
    kept = keep(SamplingParams(top_p=0.8))  # 0.75 < 0.8: one of the two 0.125 entries joins
    assert kept[:2] == [True, True] and sum(kept) == 3
    assert keep(SamplingParams(top_p=0.9)) == [True, True, True, True]
    assert keep(SamplingParams(top_k=2)) == [True, True, False, False]
    assert keep(SamplingParams(top_p=0.01)) == [True, False, False, False]  # at least one stays
    t = sampling_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(t, logits / 0.5)


def test_sampling_follows_the_truncated_distribution():
    """Draws from the loop match softmax(logits / T) restricted to the top-p set."""
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    p = SamplingParams(temperature=0.8, top_p=0.9)
    probs = sampling_logits(logits, p).softmax(-1)
    draws = draw(probs.expand(20000, -1) * 3.0)  # unnormalised weights are fine
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert torch.allclose(freq, probs[0], atol=0.02)
    assert freq[-1] == 0  # outside the nucleus
    # zero weights at both ends and in the middle are never drawn
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 0.0]]).expand(5000, -1)
    assert set(draw(w).tolist()) == {1, 3}


def test_a_bad_decoder_is_named():
    with pytest.raises(ValueError, match="rollout.engine_options.decoder='fast'"):
        HFEngine(tiny_qwen3(), PAD, [EOS], decoder="fast")


@pytest.mark.slow
def test_step_loss_is_the_same_with_scores_from_generation(tmp_path):
    """Greedy toy rollouts: decoder=loop (scores from generation, no student pass) and
    decoder=generate (transformers generate, then the scoring pass) give the same losses and
    release statistics; the loop's student_score stage does nothing."""
    from e2e import compose_cfg, mlflow_runs

    from opd_lit.train import run

    hist = {}
    for dec in ("loop", "generate"):
        d = tmp_path / dec
        d.mkdir()
        cfg = compose_cfg(d, "method=release_bic", "rollout.greedy=true", f"rollout.engine_options.decoder={dec}",
                          "eval.at_start=false", "eval.at_end=false", "checkpoint.every_n_steps=0")
        run(cfg)
        client, (r,) = mlflow_runs(d / "mlflow.db")
        hist[dec] = {name: [m.value for m in sorted(client.get_metric_history(r.info.run_id, name), key=lambda m: m.step)]
                     for name in ("train/loss", "release/accepted_frac", "student/logp_mean", "time/student_score_s")}
    for name in ("train/loss", "release/accepted_frac", "student/logp_mean"):
        assert hist["loop"][name] == pytest.approx(hist["generate"][name], rel=1e-4, abs=1e-5), name
    assert max(hist["loop"]["time/student_score_s"]) < 1e-3
