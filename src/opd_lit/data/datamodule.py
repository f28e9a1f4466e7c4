"""RolloutDataModule: prompts in, rollout batches out (one DataModule for every method).

The DataLoader yields plain lists of prompt records. After Lightning moves a prompt batch to
the device, :meth:`RolloutDataModule.on_after_batch_transfer` turns it into a
:class:`~opd_lit.batch.RolloutBatch`: it renders the prompts with the student's chat template,
samples responses with the rollout engine, scores them once with the current student (log-prob
of each sampled token, its top-K candidate ids, entropy) unless the engine already did, renders
the teacher's own prompt, and segments the responses into sentences when the method asks.
After each optimizer step :meth:`sync_weights` pushes the new student weights into the engine.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from opd_lit.batch import RolloutBatch, left_pad, right_pad
from opd_lit.data.prompts import PromptSpec, load_prompt_records
from opd_lit.models import end_of_turn_ids, load_tokenizer, render_prompt
from opd_lit.progress import set_stage
from opd_lit.rollout import SamplingParams, build_engine
from opd_lit.scoring import score_tokens
from opd_lit.settings import spec_from

log = logging.getLogger(__name__)


@dataclass
class RolloutSpec:
    """``rollout.*`` config keys."""

    engine: str = "hf"
    prompts_per_step: int = 32
    samples_per_prompt: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_prompt_tokens: int = 2048
    gen_batch_size: int = 64  # hf: prompts per generate() call
    score_chunk_size: int = 4096  # positions per lm_head chunk when scoring
    # sentence segmentation (CPU) in a background thread, overlapping the student and teacher
    # scoring passes; waited for where the segments are first read (the release rule)
    segment_in_background: bool = True
    # vllm-only keys (tensor_parallel_size, gpu_memory_utilization, ...) are passed through
    engine_options: dict[str, Any] | None = None


_spec = spec_from


class StepBatchSampler(Sampler[list[int]]):
    """Exactly ``num_steps`` batches of prompt indices from ``start_step`` on.

    Batch ``s`` covers positions ``[s*b, (s+1)*b)`` of an endless stream made of seeded
    permutations of the dataset (one per pass), so the data position after any step is a
    function of the step alone: resuming at step ``s`` continues the same stream.
    """

    def __init__(self, size: int, batch_size: int, num_steps: int, seed: int, start_step: int = 0):
        if size < 1:
            raise ValueError("no prompts to sample from")
        self.size, self.batch_size = size, batch_size
        self.num_steps, self.seed, self.start_step = num_steps, seed, start_step

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def batch(self, step: int) -> list[int]:
        out, pos = [], step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.size)
            take = min(self.batch_size - len(out), self.size - offset)
            out.extend(self._perm(epoch)[offset : offset + take])
            pos += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.num_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)


class RolloutDataModule(L.LightningDataModule):
    def __init__(
        self,
        data: dict[str, Any],
        rollout: dict[str, Any],
        student_path: str,
        teacher_path: str,
        seed: int = 0,
        student_template_kwargs: dict[str, Any] | None = None,
        teacher_template_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.data_spec: PromptSpec = _spec(PromptSpec, data, "data")
        self.spec: RolloutSpec = _spec(RolloutSpec, rollout, "rollout")
        self.student_path, self.teacher_path = student_path, teacher_path
        self.seed = seed
        self.student_template_kwargs = dict(student_template_kwargs or {})
        self.teacher_template_kwargs = dict(teacher_template_kwargs or {})
        self.records: list[dict[str, Any]] = []
        self.start_step = 0
        # Longest response the run's engine will be asked for outside training (the in-training
        # evaluation's budget, set by train.build): vLLM's context is sized for the longer one.
        self.eval_max_new_tokens = 0
        self._engine = None
        self._teacher_prompts: dict[str, list[int]] = {}
        self.student_tokenizer = None
        self.teacher_tokenizer = None

    # ---- setup -------------------------------------------------------------------------
    def prepare_tokenizers(self) -> None:
        if self.student_tokenizer is None:
            self.student_tokenizer = load_tokenizer(self.student_path, "student.path")
            self.teacher_tokenizer = load_tokenizer(self.teacher_path, "teacher.path")
            self.eos_ids = end_of_turn_ids(self.student_tokenizer, self.student_path)

    def setup(self, stage: str | None = None) -> None:
        if self.records:
            return
        self.prepare_tokenizers()
        records = load_prompt_records(self.data_spec)
        kept, dropped = [], 0
        for r in records:
            ids = render_prompt(self.student_tokenizer, r["messages"], **self.student_template_kwargs)
            if len(ids) > self.spec.max_prompt_tokens:
                dropped += 1
                continue
            kept.append({**r, "prompt_ids": ids})
        if dropped:
            log.warning(
                "dropped %d of %d prompts longer than rollout.max_prompt_tokens=%d",
                dropped, len(records), self.spec.max_prompt_tokens,
            )
        if not kept:
            raise ValueError(
                f"rollout.max_prompt_tokens={self.spec.max_prompt_tokens}: every prompt is longer"
            )
        self.records = kept

    def num_steps(self) -> int:
        trainer = getattr(self, "trainer", None)
        steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if steps is None or steps < 0:
            raise ValueError("trainer.max_steps must be set (>= 1): OPD runs a fixed number of steps")
        return steps

    def train_dataloader(self) -> DataLoader:
        sampler = StepBatchSampler(
            len(self.records), self.spec.prompts_per_step, self.num_steps(), self.seed, self.start_step
        )
        return DataLoader(self.records, batch_sampler=sampler, collate_fn=list, num_workers=0)

    # ---- the engine --------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            module = self.trainer.lightning_module
            options = dict(self.spec.engine_options or {})
            if self.spec.engine == "hf":
                options.setdefault("batch_size", self.spec.gen_batch_size)
            elif self.spec.engine == "vllm" and options.get("max_model_len") is None:
                budget = max(self.spec.max_new_tokens, self.eval_max_new_tokens)
                options["max_model_len"] = self.spec.max_prompt_tokens + budget
            self._engine = build_engine(
                self.spec.engine,
                module.student,
                pad_id=self.student_tokenizer.pad_token_id,
                eos_ids=self.eos_ids,
                **options,
            )
        return self._engine

    def sampling_params(self, max_new_tokens: int | None = None, greedy: bool = False) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.spec.max_new_tokens,
            temperature=self.spec.temperature,
            top_p=self.spec.top_p,
            top_k=self.spec.top_k,
            greedy=greedy,
        )

    def sync_weights(self, model: torch.nn.Module) -> float:
        """Push the student's new weights into the rollout engine; returns seconds spent."""
        if self._engine is None:
            return 0.0
        t0 = time.perf_counter()
        self._engine.sync_weights(model)
        return time.perf_counter() - t0

    def teacher_prompt(self, record: dict[str, Any]) -> list[int]:
        key = record["id"]
        if key not in self._teacher_prompts:
            self._teacher_prompts[key] = render_prompt(
                self.teacher_tokenizer, record["messages"], **self.teacher_template_kwargs
            )
        return self._teacher_prompts[key]

    # ---- prompt batch -> rollout batch -------------------------------------------------
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # plain records; the rollout batch is built on the right device below

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> RolloutBatch:
        if isinstance(batch, RolloutBatch):
            return batch
        module = self.trainer.lightning_module
        return self.make_rollouts(batch, module)

    def make_rollouts(self, records: list[dict[str, Any]], module) -> RolloutBatch:
        needs = module.needs
        device = module.device
        n = self.spec.samples_per_prompt
        pad_id = self.student_tokenizer.pad_token_id

        set_stage(self.trainer, "rollout")
        t0 = time.perf_counter()
        params = self.sampling_params(max_new_tokens=module.generation_limit(self.spec.max_new_tokens))
        params.logprobs = needs.topk  # engines that can return them spare the scoring pass below
        gen = self.engine.generate([r["prompt_ids"] for r in records], n, params)
        gen_s = time.perf_counter() - t0

        rows = [r for r in records for _ in range(n)]
        prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], pad_id)
        response_ids, response_mask = right_pad(gen.response_ids, pad_id)
        t_prompt_ids, t_prompt_mask = left_pad([self.teacher_prompt(r) for r in rows], pad_id)
        background = needs.segments and self.spec.segment_in_background
        batch = (BackgroundSegmentsBatch if background else RolloutBatch)(
            records=rows,
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            student_logprobs=torch.zeros_like(response_mask),
            student_topk_ids=torch.zeros((*response_ids.shape, needs.topk), dtype=torch.long),
            teacher_prompt_ids=t_prompt_ids,
            teacher_prompt_mask=t_prompt_mask,
            group_ids=torch.arange(len(records)).repeat_interleave(n),
        ).to(device)

        if background:
            batch.start_segments(self._segmenter(), self._segment_tokenizer(), response_ids, response_mask)

        t1 = time.perf_counter()
        # What the engine computed while sampling (vllm) is used as is; the student scoring
        # pass runs only for what is missing: hf returns neither, and no engine returns the
        # entropy (LGR's trigger), so then the pass computes the entropy alone.
        have_logprobs = gen.logprobs is not None
        have_topk = needs.topk == 0 or gen.topk_ids is not None
        if have_logprobs:
            batch.student_logprobs = right_pad_float(gen.logprobs, response_ids.shape).to(device)
        if needs.topk and gen.topk_ids is not None:
            batch.student_topk_ids = _pad_topk(gen.topk_ids, response_ids.shape, needs.topk).to(device)
        if not (have_logprobs and have_topk) or needs.entropy:
            ids, mask = batch.student_inputs()
            with torch.no_grad():
                scores = score_tokens(
                    module.student, ids, mask, batch.response_ids, batch.response_mask,
                    topk=0 if have_topk else needs.topk, entropy=True,
                    chunk_size=self.spec.score_chunk_size,
                )
            batch.student_entropy = scores.entropy
            if not have_logprobs:
                batch.student_logprobs = scores.logprobs
            if not have_topk:
                batch.student_topk_ids = scores.topk_ids
        score_s = time.perf_counter() - t1

        t2 = time.perf_counter()
        texts = self.student_tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True)
        batch.extras["response_text"] = texts
        if needs.segments and not background:
            from opd_lit.release import segment_ids_batch

            batch.segment_ids = segment_ids_batch(
                self.student_tokenizer, response_ids, response_mask
            ).to(device)
        seg_s = time.perf_counter() - t2

        tokens = float(response_mask.sum().item())
        batch.timings.update(rollout_s=gen_s, rollout_tokens=tokens, student_score_s=score_s)
        if not background:  # the background thread records its own segment_s
            batch.timings["segment_s"] = seg_s
        return batch

    # ---- background segmentation -------------------------------------------------------
    def _segmenter(self) -> ThreadPoolExecutor:
        if getattr(self, "_segment_pool", None) is None:
            self._segment_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-segment")
        return self._segment_pool

    def _segment_tokenizer(self):
        # A fast tokenizer must not be used by two threads at once ("Already borrowed"):
        # the segmentation thread gets its own copy.
        if getattr(self, "_seg_tokenizer", None) is None:
            self._seg_tokenizer = copy.deepcopy(self.student_tokenizer)
        return self._seg_tokenizer

    def teardown(self, stage: str | None = None) -> None:
        pool = getattr(self, "_segment_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._segment_pool = None


class BackgroundSegmentsBatch(RolloutBatch):
    """A :class:`RolloutBatch` whose ``segment_ids`` are computed in a background thread.

    Sentence segmentation is CPU work (decode, Punkt, offsets); started right after the
    rollout, it overlaps the student and teacher scoring passes. Reading ``segment_ids`` the
    first time waits for it (``timings["segment_wait_s"]`` = the time the step was blocked);
    ``timings["segment_s"]`` is the segmentation's own time. Assigning ``segment_ids``
    replaces the pending result.
    """

    def start_segments(self, pool: ThreadPoolExecutor, tokenizer, response_ids, response_mask) -> None:
        from opd_lit.release import segment_ids_batch

        ids, mask = response_ids.cpu(), response_mask.cpu()
        timings = self.timings

        def work() -> torch.Tensor:
            t0 = time.perf_counter()
            try:
                return segment_ids_batch(tokenizer, ids, mask)
            finally:
                timings["segment_s"] = time.perf_counter() - t0

        self.__dict__["_segment_device"] = self.response_ids.device
        self.__dict__["_segment_future"] = pool.submit(work)

    @property
    def segment_ids(self) -> torch.Tensor | None:
        future = self.__dict__.get("_segment_future")
        if future is not None:
            t0 = time.perf_counter()
            value = future.result().to(self.__dict__["_segment_device"])
            self.__dict__["_segment_future"] = None
            self.__dict__["_segment_ids"] = value
            self.timings["segment_wait_s"] = time.perf_counter() - t0
        return self.__dict__.get("_segment_ids")

    @segment_ids.setter
    def segment_ids(self, value: torch.Tensor | None) -> None:
        self.__dict__["_segment_future"] = None
        self.__dict__["_segment_ids"] = value


def right_pad_float(rows: list[list[float]], shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def _pad_topk(rows: list[list[list[int]]], shape: torch.Size, k: int) -> torch.Tensor:
    out = torch.zeros((*shape, k), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor([c[:k] for c in r], dtype=torch.long)
    return out
