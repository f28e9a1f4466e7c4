"""RolloutDataModule: the prompts and their sampling order (one DataModule for every method).

It renders every prompt with the student's chat template at set-up (and the teacher's on
demand), and yields, for each optimizer step, this rank's share of that step's prompt records
(:class:`StepBatchSampler`). Turning records into rollouts is the step's work
(:func:`opd_lit.step.run_step`); the DataModule also holds the tokenizers and the sampling
settings the step's rollout stage reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from opd_lit.data.prompts import PromptSpec, load_prompt_records
from opd_lit.models import end_of_turn_ids, load_tokenizer, render_prompt
from opd_lit.rollout import SamplingParams
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
    # Greedy rollouts: deterministic, off-distribution for OPD (which samples at temperature
    # 1); for debugging and for checks that two set-ups give the same update.
    greedy: bool = False
    max_prompt_tokens: int = 2048
    gen_batch_size: int = 64  # hf: prompts per generate() call
    score_chunk_size: int = 4096  # positions per lm_head chunk when scoring
    # vllm-only keys (tensor_parallel_size, gpu_memory_utilization, ...) are passed through
    engine_options: dict[str, Any] | None = None


_spec = spec_from


class StepBatchSampler(Sampler[list[int]]):
    """Exactly ``num_steps`` batches of prompt indices from ``start_step`` on; this rank's share.

    Global batch ``s`` covers positions ``[s*b, (s+1)*b)`` of an endless stream made of seeded
    permutations of the dataset (one per pass), so the data position after any step is a
    function of the step alone (resuming at step ``s`` continues the same stream), and the
    global batch is the same whatever the number of ranks: rank ``r`` of ``W`` takes the
    ``r``-th of ``W`` contiguous, disjoint blocks of ``b / W`` prompts.
    """

    def __init__(
        self, size: int, batch_size: int, num_steps: int, seed: int, start_step: int = 0,
        rank: int = 0, world_size: int = 1,
    ):
        if size < 1:
            raise ValueError("no prompts to sample from")
        if batch_size % world_size:
            raise ValueError(
                f"rollout.prompts_per_step={batch_size} is the global batch and must split evenly "
                f"over the {world_size} ranks (allowed: a multiple of {world_size})"
            )
        self.size, self.batch_size = size, batch_size
        self.num_steps, self.seed, self.start_step = num_steps, seed, start_step
        self.rank, self.world_size = rank, world_size

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def global_batch(self, step: int) -> list[int]:
        out, pos = [], step * self.batch_size
        while len(out) < self.batch_size:
            epoch, offset = divmod(pos, self.size)
            take = min(self.batch_size - len(out), self.size - offset)
            out.extend(self._perm(epoch)[offset : offset + take])
            pos += take
        return out

    def batch(self, step: int) -> list[int]:
        share = self.batch_size // self.world_size
        return self.global_batch(step)[self.rank * share : (self.rank + 1) * share]

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
        trainer = self.trainer
        sampler = StepBatchSampler(
            len(self.records), self.spec.prompts_per_step, self.num_steps(), self.seed, self.start_step,
            rank=trainer.global_rank, world_size=trainer.world_size,
        )
        return DataLoader(self.records, batch_sampler=sampler, collate_fn=list, num_workers=0)

    # ---- what the step's rollout stage reads -----------------------------------------------
    def engine_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`opd_lit.rollout.build_engine` for this run."""
        options = dict(self.spec.engine_options or {})
        options.update(pad_id=self.student_tokenizer.pad_token_id, eos_ids=self.eos_ids)
        if self.spec.engine == "hf":
            options.setdefault("batch_size", self.spec.gen_batch_size)
        elif self.spec.engine == "vllm" and options.get("max_model_len") is None:
            budget = max(self.spec.max_new_tokens, self.eval_max_new_tokens)
            options["max_model_len"] = self.spec.max_prompt_tokens + budget
        return options

    def sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_new_tokens or self.spec.max_new_tokens,
            temperature=self.spec.temperature,
            top_p=self.spec.top_p,
            top_k=self.spec.top_k,
            greedy=self.spec.greedy,
        )

    def teacher_prompt(self, record: dict[str, Any]) -> list[int]:
        key = record["id"]
        if key not in self._teacher_prompts:
            self._teacher_prompts[key] = render_prompt(
                self.teacher_tokenizer, record["messages"], **self.teacher_template_kwargs
            )
        return self._teacher_prompts[key]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        return batch  # plain prompt records; the step builds the rollout batch on the device
