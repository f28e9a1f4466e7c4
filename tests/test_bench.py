"""``make bench`` (``python -m opd_lit.bench``) and the performance configuration."""

from __future__ import annotations

import json

import pytest
from e2e import REPO, compose_cfg, run_module

KEYS = [
    "rollout_hf_tok_s", "rollout_vllm_tok_s", "rollout_speedup", "score_full_tok_s",
    "score_chunked_tok_s", "score_full_peak_mib", "score_chunked_peak_mib", "score_mem_ratio",
    "score_speed_ratio", "train_tok_s", "train_mfu", "release_ms", "release_step_share", "device",
]

SMALL = [
    "bench.reps=1", "bench.score_vocab=4096", "bench.score_tokens=256", "bench.loss_tokens=128",
    "bench.score_chunk=64", "bench.rollout_prompts=4", "bench.rollout_new_tokens=16",
]


@pytest.mark.slow
def test_bench_prints_one_json_object_with_every_key(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_module(
        "opd_lit.bench", "bench.parts=score,loss,train,release", *SMALL, f"bench.out={out}",
        cwd=tmp_path, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout  # one JSON object, nothing else on stdout
    result = json.loads(lines[0])
    assert json.loads(out.read_text()) == result
    for key in KEYS:
        assert key in result, key
    assert result["device"].startswith(("cpu", "cuda"))
    for key in ("score_full_tok_s", "score_chunked_tok_s", "train_tok_s", "release_ms"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    for key in ("score_full_peak_mib", "score_chunked_peak_mib"):
        assert result[key] is not None and result[key] >= 0, key
    assert result["score_mem_ratio"] == pytest.approx(
        result["score_chunked_peak_mib"] / result["score_full_peak_mib"], rel=1e-2, abs=1e-3
    )
    assert result["score_speed_ratio"] == pytest.approx(
        result["score_chunked_tok_s"] / result["score_full_tok_s"], rel=1e-2
    )
    assert 0 < result["release_step_share"] < 1
    if result["device"].startswith("cpu"):
        assert result["train_mfu"] is None
    # rollout not asked for: its keys are there, null
    assert result["rollout_hf_tok_s"] is None and result["rollout_vllm_tok_s"] is None


def test_bench_refuses_the_1p7b_size_without_a_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    proc = run_module("opd_lit.bench", "bench.size=1p7b", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "GPU" in proc.stderr and "bench.size=1p7b" in proc.stderr
    assert proc.stdout.strip() == ""


def test_bench_rejects_bad_keys(tmp_path):
    for arg, word in (("bench.nope=1", "bench.nope"), ("bench.parts=fly", "fly"),
                      ("size=tiny", "bench.KEY=VALUE"), ("bench.peer=x", "peer")):
        proc = run_module("opd_lit.bench", arg, cwd=tmp_path, timeout=120)
        assert proc.returncode != 0 and word in proc.stderr, (arg, proc.stderr[-500:])


def test_bench_without_vllm_reports_null_with_a_note(monkeypatch, tmp_path):
    from opd_lit import bench

    calls = []
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    b = bench.Bench(bench.make_size("tiny", {"rollout_prompts": "2", "rollout_new_tokens": "4"}),
                    ["rollout"], 1, "none", tmp_path)
    monkeypatch.setattr(bench, "_run_worker", lambda *a, **k: calls.append(a))
    b.setup_models()
    b.bench_rollout()
    assert b.out["rollout_vllm_tok_s"] is None and b.out["rollout_speedup"] is None
    assert b.out["rollout_hf_tok_s"] > 0 and not calls
    assert any("vLLM is not installed" in n for n in b.notes)


def test_bench_rollout_times_every_hf_path_in_one_run(monkeypatch, tmp_path):
    from opd_lit import bench

    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)  # no vLLM run
    b = bench.Bench(bench.make_size("tiny", {"rollout_prompts": "3", "rollout_new_tokens": "5"}),
                    ["rollout"], 1, "none", tmp_path)
    b.setup_models()
    b.bench_rollout()
    for path in ("generate", "generate_scored", "static", "loop", "loop_scored"):
        assert b.out[f"rollout_hf_{path}_tok_s"] > 0, path
    assert b.out["rollout_loop_speedup"] == pytest.approx(
        b.out["rollout_hf_loop_scored_tok_s"] / b.out["rollout_hf_generate_scored_tok_s"], rel=1e-2)
    assert b._rollout["tokens"] == sum(len(r) for r in b._rollout["responses"])


def test_peer_pair_is_a_dense_student_and_a_moe_teacher_with_one_vocabulary(tmp_path):
    from transformers import AutoConfig

    from opd_lit import bench

    size = bench.make_size("tiny", {"peer_vocab": "512", "peer_hidden": "32", "peer_layers": "1"})
    student, teacher, note = bench.qwen3_pair(size, tmp_path)
    s, t = AutoConfig.from_pretrained(student), AutoConfig.from_pretrained(teacher)
    assert s.model_type == "qwen3" and t.model_type == "qwen3_moe"
    assert s.vocab_size == t.vocab_size == 512 and t.num_experts == size.peer_experts
    assert s.hidden_size == 32 and t.hidden_size == 64 and s.num_hidden_layers == 1
    assert "Qwen3-MoE" in note
    assert bench.qwen3_pair(size, tmp_path)[:2] == (student, teacher)  # built once


def test_bench_peer_without_trl_reports_null_with_the_install_line(monkeypatch, tmp_path):
    from opd_lit import bench

    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
    b = bench.Bench(bench.make_size("tiny", {}), [], 1, "trl", tmp_path)
    b.out, b.notes = {}, []
    b.bench_peer()
    assert b.out["peer_step_ratio"] is None and b.out["peer_mem_ratio"] is None
    assert any("pip install --no-deps trl" in n for n in b.notes)


def test_fsdp_part_times_an_fsdp2_update(tmp_path):
    """The part `make gpu-check` runs for the 1.7B shape, on the toy student and the CPU."""
    proc = run_module("opd_lit.bench", "bench.parts=fsdp", "bench.reps=1", f"bench.out={tmp_path / 'b.json'}",
                      cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "b.json").read_text())
    assert out["fsdp_train_tok_s"] > 0 and out["fsdp_train_s"] > 0 and out["fsdp_train_mfu"] is None  # no GPU


def test_trainer_fsdp_and_ddp_compose_and_build_their_strategies(tmp_path):
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from opd_lit.parallel import FSDP2Strategy

    cfg = compose_cfg(tmp_path, "trainer=fsdp", "trainer.devices=8", "trainer.num_nodes=2")
    assert cfg.trainer.precision == "32-true" and cfg.trainer.num_nodes == 2  # bf16 is FSDP2's own
    strategy = instantiate(cfg.trainer.strategy, _convert_="all")  # no GPU needed to build it
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.activation_checkpointing and strategy.reshard_after_forward and not strategy.shard_teacher
    assert strategy.mixed_precision == "auto"
    with pytest.raises(ValueError, match=r"trainer.strategy.mixed_precision='fp8' is not one of"):
        FSDP2Strategy(mixed_precision="fp8")
    ddp = compose_cfg(tmp_path, "trainer=ddp", "trainer.devices=4")
    assert ddp.trainer.precision == "bf16-mixed" and not ddp.trainer.use_distributed_sampler
    assert compose_cfg(tmp_path, "trainer=ddp", "trainer.accelerator=cpu").trainer.precision == "32-true"
    assert isinstance(instantiate(ddp.trainer.strategy), DDPStrategy)


def test_student_config_has_the_throughput_switches(tmp_path):
    cfg = compose_cfg(tmp_path, "student.dtype=bfloat16", "student.attn_implementation=sdpa",
                      "student.gradient_checkpointing=true")
    assert cfg.student.dtype == "bfloat16" and cfg.student.gradient_checkpointing is True


def test_make_bench_target_runs_the_module():
    assert "-m opd_lit.bench" in (REPO / "Makefile").read_text()


# ---- memory-lean scoring (opd_lit.scoring): the paths the bench measures ---------------------

def _rollout(seed=0, batch=5, prompt=7, resp=11, vocab=67):
    from conftest import random_rollout

    from opd_lit.batch import join_prompt_response

    p, pm, r, rm = random_rollout(batch, prompt, resp, vocab, seed=seed)
    ids, am = join_prompt_response(p, pm, r, rm)
    return ids, am, r, rm


@pytest.mark.parametrize("vocab_chunk", [None, 16, 5])
def test_no_grad_scoring_in_place_matches_full_logits(vocab_chunk):
    import torch
    from conftest import tiny_qwen3

    from opd_lit.scoring import score_tokens

    model = tiny_qwen3()
    for seed in range(2):
        ids, am, r, rm = _rollout(seed)
        out = model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0))
        width = ids.shape[1] - r.shape[1]
        logp = out.logits[:, width - 1 : width - 1 + r.shape[1]].float().log_softmax(-1).detach()
        valid = rm > 0
        gather = torch.randint(0, 67, (*r.shape, 4))
        for chunk in (1, 4, 1000):
            with torch.no_grad():
                own = score_tokens(model, ids, am, r, rm, topk=5, entropy=True, chunk_size=chunk,
                                   vocab_chunk_size=vocab_chunk)
                given = score_tokens(model, ids, am, r, rm, gather_ids=gather, chunk_size=chunk,
                                     vocab_chunk_size=vocab_chunk)
            lp = logp.gather(-1, r.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(own.logprobs[valid], lp[valid], atol=1e-5, rtol=0)
            torch.testing.assert_close(given.logprobs[valid], lp[valid], atol=1e-5, rtol=0)
            top_lp, top_ids = logp.topk(5, dim=-1)
            assert torch.equal(own.topk_ids[valid], top_ids[valid])
            torch.testing.assert_close(own.topk_logprobs[valid], top_lp[valid], atol=1e-5, rtol=0)
            ent = -(logp.exp() * logp).sum(-1)
            torch.testing.assert_close(own.entropy[valid], ent[valid], atol=1e-5, rtol=0)
            torch.testing.assert_close(
                given.topk_logprobs[valid], logp.gather(-1, gather)[valid], atol=1e-5, rtol=0
            )
            assert torch.all(own.logprobs[~valid] == 0) and torch.all(own.entropy[~valid] == 0)


@pytest.mark.parametrize("tie,vocab_chunk", [(True, None), (False, None), (True, 16), (False, 7)])
def test_loss_paths_give_the_full_logit_gradients(tie, vocab_chunk):
    """score_tokens with gradients (recompute-in-backward) and fused_logprob_loss (gradients in
    the forward) against autograd through full [B, T, V] logits: values and every gradient."""
    import torch
    from conftest import tiny_qwen3

    from opd_lit.scoring import fused_logprob_loss, score_tokens, score_tokens_full

    ids, am, r, rm = _rollout(3)
    coef = torch.randn(r.shape)
    results = {}
    for mode in ("full", "chunked", "fused"):
        model = tiny_qwen3(seed=7, tie=tie).train()
        if mode == "full":
            lp = score_tokens_full(model, ids, am, r, rm).logprobs
            loss = (coef * lp * (rm > 0)).sum()
        elif mode == "chunked":
            lp = score_tokens(model, ids, am, r, rm, chunk_size=4, vocab_chunk_size=vocab_chunk).logprobs
            loss = (coef * lp).sum()
        else:
            loss, lp = fused_logprob_loss(model, ids, am, r, rm, coef, chunk_size=4)
            assert not lp.requires_grad
        (0.5 * loss).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[mode] = (loss.detach(), lp.detach(), grads)
    for mode in ("chunked", "fused"):
        torch.testing.assert_close(results[mode][0], results["full"][0], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(results[mode][1], results["full"][1], atol=1e-5, rtol=0)
        torch.testing.assert_close(results[mode][2], results["full"][2], atol=1e-5, rtol=1e-4)


def test_fused_loss_micro_batches_add_up_to_the_policy_gradient_loss():
    import torch
    from conftest import tiny_qwen3

    from opd_lit.objectives import policy_gradient_loss
    from opd_lit.scoring import fused_logprob_loss, score_tokens

    ids, am, r, rm = _rollout(5, batch=6)
    adv, w = torch.randn(r.shape), (torch.rand(r.shape) > 0.3).float()
    n_tok = rm.sum()
    ref = tiny_qwen3(seed=2).train()
    policy_gradient_loss(score_tokens(ref, ids, am, r, rm, chunk_size=3).logprobs, adv, w, n_tok).backward()
    model = tiny_qwen3(seed=2).train()
    for rows in (slice(0, 2), slice(2, 6)):
        coef = -(adv * w)[rows] / n_tok
        loss, _ = fused_logprob_loss(model, ids[rows], am[rows], r[rows], rm[rows], coef, chunk_size=3)
        loss.backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)


def test_grad_scoring_with_candidates_keeps_the_checkpointed_path():
    import torch
    from conftest import tiny_qwen3

    from opd_lit.scoring import score_tokens, score_tokens_full

    ids, am, r, rm = _rollout(6)
    gather = torch.randint(0, 67, (*r.shape, 3))
    outs = []
    for chunked in (True, False):
        model = tiny_qwen3(seed=4).train()
        s = (score_tokens(model, ids, am, r, rm, gather_ids=gather, chunk_size=4) if chunked
             else score_tokens_full(model, ids, am, r, rm, gather_ids=gather))
        (s.topk_logprobs.sum() + s.logprobs.sum()).backward()
        outs.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


# ---- release rule cost: sentence segmentation in a background thread --------------------------

def test_background_segments_equal_the_synchronous_ones():
    from types import SimpleNamespace

    import torch

    from opd_lit.batch import Needs, right_pad
    from opd_lit.release import segment_ids_batch
    from opd_lit.step import StepParts, start_segments
    from opd_lit.toy import toy_train_problems
    from opd_lit.toy.tokenizer import make_hf_tokenizer, train_tokenizer

    tok = make_hf_tokenizer(train_tokenizer(), "student")
    texts = [p["solution"] for p in toy_train_problems(6)]
    r, rm = right_pad([tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id)
    want = segment_ids_batch(tok, r, rm)
    parts = StepParts(data=SimpleNamespace(student_tokenizer=tok), teacher=None, needs=Needs(segments=True),
                      make_engine=lambda: None)
    batch = SimpleNamespace(response_ids=r, response_mask=rm)
    try:
        got, seconds = start_segments(parts, batch).result()  # the thread's own tokenizer copy
    finally:
        parts.close()
    assert torch.equal(got, want) and int(want.max()) >= 3
    assert seconds > 0 and parts._segment_tokenizer is not tok
