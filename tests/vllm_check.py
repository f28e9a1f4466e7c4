"""Run by tests/test_vllm.py in a fresh process (vLLM changes process-wide state).

Builds a tiny random Qwen3 (head_dim 32, the CPU attention minimum), starts the ``vllm``
engine on it, trains the HF copy for a few optimizer steps and syncs the engine, and prints
one JSON line of measurements for the test to check:

- ``before``: engine log-probs vs the initial student (``score_tokens``), before any sync;
- ``stale``: the same after training the HF copy but before the sync (must differ);
- ``after``: after ``sync_weights`` (must match the trained student);
- top-K agreement, stop token handling, greedy with n > 1, timings.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch


def main(workdir: str) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_lit.batch import join_prompt_response, left_pad, right_pad
    from opd_lit.objectives import policy_gradient_loss
    from opd_lit.rollout import SamplingParams, build_engine
    from opd_lit.scoring import score_tokens
    from opd_lit.step import pad_topk, right_pad_float

    eos, pad, vocab, k, n = 1, 0, 96, 4, 2
    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(workdir)
    student = Qwen3ForCausalLM.from_pretrained(workdir, dtype=torch.float32)
    student.config._attn_implementation = "sdpa"
    student.eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [20, 21]]

    t0 = time.perf_counter()
    engine = build_engine(
        "vllm", student, pad_id=pad, eos_ids=[eos], max_model_len=128, initial_sync=False, seed=0,
    )
    startup = time.perf_counter() - t0

    def rollout_vs_student(max_new=24):
        gen = engine.generate(prompts, n, SamplingParams(max_new_tokens=max_new, logprobs=k))
        p, pm = left_pad([q for q in prompts for _ in range(n)], pad)
        r, rm = right_pad(gen.response_ids, pad)
        ids, am = join_prompt_response(p, pm, r, rm)
        with torch.no_grad():
            s = score_tokens(student, ids, am, r, rm, topk=k)
        valid = rm > 0
        lp = right_pad_float(gen.logprobs, rm.shape)
        top = pad_topk(gen.topk_ids, rm.shape, k)
        return {
            "max_abs_diff": float((lp - s.logprobs)[valid].abs().max()),
            "top1_agree": float((top[..., 0] == s.topk_ids[..., 0])[valid].float().mean()),
            "topk_set_agree": float(
                (top.sort(-1).values == s.topk_ids.sort(-1).values).all(-1)[valid].float().mean()
            ),
            "tokens": int(rm.sum()),
            "rows": len(gen.response_ids),
            "lengths": [len(x) for x in gen.response_ids],
            "eos_only_at_end": all(
                (eos not in x[:-1]) for x in gen.response_ids
            ),
            "logprob_rows_match": [len(a) for a in gen.logprobs] == [len(x) for x in gen.response_ids],
        }, (ids, am, r, rm)

    before, batch = rollout_vs_student()

    # Train the HF copy: a few optimizer steps of the on-policy loss on the engine's rollouts.
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    ids, am, r, rm = batch
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(rm.shape, generator=g) * rm
    for _ in range(3):
        opt.zero_grad()
        lp = score_tokens(student, ids, am, r, rm).logprobs
        policy_gradient_loss(lp, adv, rm, rm.sum()).backward()
        opt.step()
    student.eval()

    stale, _ = rollout_vs_student()
    t0 = time.perf_counter()
    engine.sync_weights(student)
    sync_s = time.perf_counter() - t0
    after, _ = rollout_vs_student()
    greedy = engine.generate(prompts[:2], 2, SamplingParams(max_new_tokens=8, greedy=True))
    plain = engine.generate(prompts[:1], 1, SamplingParams(max_new_tokens=4))
    engine.close()
    return {
        "before": before, "stale": stale, "after": after, "syncs": engine.syncs,
        "greedy_rows": [len(x) for x in greedy.response_ids],
        "greedy_pairs_equal": greedy.response_ids[0] == greedy.response_ids[1]
        and greedy.response_ids[2] == greedy.response_ids[3],
        "plain_has_no_logprobs": plain.logprobs is None and plain.topk_ids is None,
        "startup_s": round(startup, 2), "sync_s": round(sync_s, 4),
    }


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        out = main(sys.argv[1] if len(sys.argv) > 1 else tmp)
    print(json.dumps(out), flush=True)
