"""One training step of on-policy distillation, top to bottom: :func:`run_step`.

    prompts ─► rollout ─► student scores ─► teacher scores ─► segments / release
            ─► method.supervise() ─► loss and update ─► weight sync into the rollout engine

Every stage is timed (``time/<stage>_s``) and shown in the progress bar. The stages read and
fill the typed fields of one :class:`~opd_lit.batch.RolloutBatch`; what they compute is fixed
once at set-up by :class:`StepParts` (the merged :class:`~opd_lit.batch.Needs` of the method,
the loss estimator, the release statistics and the diagnostics).

Data parallelism (``trainer=ddp`` / ``trainer=fsdp``): each rank runs this function on its own
share of the global batch. Three things are global: the token count that normalises the loss
(so W ranks with B rows each give the update of one process with W·B rows), the decision to
skip a non-finite step, and every logged metric (sums, maxima and ratios reduced over ranks).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from opd_lit import parallel
from opd_lit.batch import Needs, RolloutBatch, left_pad, right_pad
from opd_lit.objectives import (
    policy_gradient_loss,
    topk_reverse_kl,
    truncated_is_weight,
    weighted_token_loss,
)
from opd_lit.progress import set_stage
from opd_lit.scoring import chunked_reverse_kl, score_tokens

if TYPE_CHECKING:
    from opd_lit.data.datamodule import RolloutDataModule
    from opd_lit.methods.base import DistillModule, Supervision
    from opd_lit.teacher import TeacherModels

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# what the step is made of (assembled once, at set-up)
# ---------------------------------------------------------------------------


@dataclass
class StepParts:
    """The step's collaborators and its merged needs (:meth:`DistillModule.setup` builds it)."""

    data: RolloutDataModule  # prompts, chat templates, tokenizers, sampling settings
    teacher: TeacherModels  # frozen teacher (+ reference), loaded by the TeacherCallback
    needs: Needs  # what every consumer of the batch asks for, merged
    make_engine: Callable[[], Any]  # builds the rollout engine on first use (on the device)
    segmenter: str = "structured"  # release.segmenter
    _engine: Any = None
    _segment_pool: ThreadPoolExecutor | None = None
    _segment_tokenizer: Any = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = self.make_engine()
        return self._engine

    def segment_pool(self) -> tuple[ThreadPoolExecutor, Any]:
        """A one-thread pool for sentence segmentation and its own tokenizer copy (a fast
        tokenizer must not be used by two threads at once: "Already borrowed")."""
        if self._segment_pool is None:
            self._segment_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opd-segment")
            self._segment_tokenizer = copy.deepcopy(self.data.student_tokenizer)
        return self._segment_pool, self._segment_tokenizer

    def close(self) -> None:
        if self._segment_pool is not None:
            self._segment_pool.shutdown(wait=True)
            self._segment_pool = None


class StageTimer:
    """``with timer("teacher"): ...`` times a stage (seconds in ``timer.seconds``) and shows it
    in the progress bar."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        set_stage(self.trainer, stage)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0


@dataclass
class UpdateResult:
    loss: float  # the global loss of the step (NaN when the update was skipped)
    grad_norm: float  # before clipping
    skipped: list[str]  # what was not finite (empty: the update was applied)
    tokens: int = 0  # response tokens with weight > 0, over all ranks
    logprob_gap: float | None = None  # mean |log π_train − log π_rollout| (engines that report it)


# ---------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------


def run_step(module: DistillModule, records: list[dict[str, Any]]) -> tuple[dict[str, float], RolloutBatch]:
    """Sample, score, supervise and update once on ``records``; returns the step's metrics
    (global) and this rank's scored batch (what the diagnostics draw from)."""
    parts, needs = module.parts, module.parts.needs
    timer = StageTimer(module.trainer)
    t_step = time.perf_counter()

    # 1. rollouts from the current student
    with timer("rollout"):
        batch = sample_rollouts(parts, records, module.generation_limit(parts.data.spec.max_new_tokens))
        batch.to(module.device)
    segments = start_segments(parts, batch) if needs.segments else None  # CPU, overlaps 2-3

    # 2. the student's log-probs, top-K candidates and entropy, where the engine gave none
    with timer("student_score"):
        score_student(module.student, batch, needs, parts.data.spec.score_chunk_size)

    # 3. teacher (and reference) log-probs of the sampled tokens and of the candidates
    with timer("teacher"):
        parts.teacher.score(batch, needs)

    # 4. sentence segments, and the release rule's decision on this batch
    with timer("segment_wait"):
        if segments is not None:
            batch.segment_ids, segment_s = segments.result()
            timer.seconds["segment"] = segment_s
            batch.segment_ids = batch.segment_ids.to(module.device)
    with timer("release"):
        if needs.release:
            module.release_decision(batch)

    # 5. the method: advantage and weight of every token
    with timer("supervise"):
        sup = module.supervise(batch)

    # 6. loss and optimizer update; a loss or gradient out of its sane range is flagged
    with timer("update"):
        result = update_student(module, batch, sup)
    verdict = module.guard.update(module.global_step, result.loss, result.grad_norm, tokens=result.tokens)
    if verdict.stop:
        from opd_lit.guards import DivergenceError

        # the step that stops the run never reaches Lightning's end-of-step logging: send its
        # verdict (and what it was judged on) to MLflow now
        log_now(module, {"train/loss": result.loss, "train/grad_norm": result.grad_norm, **verdict.metrics})
        raise DivergenceError(verdict.message)

    # 7. the new weights into the rollout engine
    with timer("sync"):
        parts.engine.sync_weights(module.student)

    timer.seconds["step"] = time.perf_counter() - t_step
    metrics = step_metrics(module, batch, sup, result, timer.seconds)
    metrics.update(verdict.metrics)  # train/diverged
    return metrics, batch


def log_now(module: DistillModule, metrics: dict[str, float]) -> None:
    """Send ``metrics`` to the loggers at the step Lightning logs this batch's metrics at."""
    trainer = module._trainer
    if trainer is None:
        return
    from opd_lit.tracking import log_metrics

    # Lightning logs a training batch at the count of batches stepped before it (0-based)
    step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
    log_metrics(trainer, metrics, step)


# ---------------------------------------------------------------------------
# stage 1: rollouts
# ---------------------------------------------------------------------------


def sample_rollouts(parts: StepParts, records: list[dict[str, Any]], max_new_tokens: int) -> RolloutBatch:
    """Sample ``rollout.samples_per_prompt`` responses per prompt (on the CPU side of the batch)."""
    dm, needs = parts.data, parts.needs
    n = dm.spec.samples_per_prompt
    pad_id = dm.student_tokenizer.pad_token_id
    params = dm.sampling_params(max_new_tokens=max_new_tokens)
    # engines that return the student's scores with the samples spare the scoring pass
    params.logprobs, params.entropy = needs.topk, needs.entropy
    gen = parts.engine.generate([r["prompt_ids"] for r in records], n, params)

    rows = [r for r in records for _ in range(n)]
    prompt_ids, prompt_mask = left_pad([r["prompt_ids"] for r in rows], pad_id)
    response_ids, response_mask = right_pad(gen.response_ids, pad_id)
    t_prompt_ids, t_prompt_mask = left_pad([dm.teacher_prompt(r) for r in rows], pad_id)
    batch = RolloutBatch(
        records=rows,
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        teacher_prompt_ids=t_prompt_ids,
        teacher_prompt_mask=t_prompt_mask,
        group_ids=torch.arange(len(records)).repeat_interleave(n),
        response_text=dm.student_tokenizer.batch_decode(gen.response_ids, skip_special_tokens=True),
    )
    if gen.logprobs is not None:
        batch.student_logprobs = right_pad_float(gen.logprobs, response_ids.shape)
        if parts.engine.engine_copy:  # an engine's own weights: π_rollout, not π_θ
            batch.rollout_logprobs = batch.student_logprobs
    if needs.topk and gen.topk_ids is not None:
        batch.student_topk_ids = pad_topk(gen.topk_ids, response_ids.shape, needs.topk)
    if needs.entropy and gen.entropy is not None:
        batch.student_entropy = right_pad_float(gen.entropy, response_ids.shape)
    return batch


def start_segments(parts: StepParts, batch: RolloutBatch) -> Future:
    """Sentence segmentation of the responses in a background thread (CPU work: decode,
    sentence splitting, offsets); ``.result()`` is ``(segment_ids [B, T], seconds)``."""
    from opd_lit.release import segment_ids_batch

    pool, tokenizer = parts.segment_pool()
    ids, mask = batch.response_ids.cpu(), batch.response_mask.cpu()

    def work() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        return segment_ids_batch(tokenizer, ids, mask, segmenter=parts.segmenter), time.perf_counter() - t0

    return pool.submit(work)


# ---------------------------------------------------------------------------
# stage 2: student scores
# ---------------------------------------------------------------------------


@torch.no_grad()
def score_student(student: torch.nn.Module, batch: RolloutBatch, needs: Needs, chunk_size: int) -> None:
    """Fill ``student_logprobs``, ``student_topk_ids`` and ``student_entropy`` that the engine
    did not return, in one no-grad pass of the student (skipped when nothing is missing: the
    hf loop and vLLM return all three with the samples)."""
    want_topk = needs.topk if batch.student_topk_ids is None else 0
    want_entropy = needs.entropy and batch.student_entropy is None
    if batch.student_logprobs is not None and not want_topk and not want_entropy:
        return
    ids, mask = batch.student_inputs()
    scores = parallel.forward_call(
        student, score_tokens, ids, mask, batch.response_ids, batch.response_mask,
        topk=want_topk, entropy=want_entropy, chunk_size=chunk_size,
    )
    if batch.student_logprobs is None:
        batch.student_logprobs = scores.logprobs
    if want_topk:
        batch.student_topk_ids = scores.topk_ids
    if want_entropy:
        batch.student_entropy = scores.entropy


# ---------------------------------------------------------------------------
# stage 6: loss and update
# ---------------------------------------------------------------------------


def micro_batches(batch: RolloutBatch, size: int) -> Iterator[tuple[slice, int, int]]:
    """``(rows, first prompt column, response width)`` of each micro-batch of ``size`` rows,
    trimmed to its own widths. Every rank gets the same number (empty ones included), so the
    gradient collectives of every backward line up across ranks."""
    size = max(1, size)
    for start in range(0, batch.batch_size, size):
        rows = slice(start, start + size)
        mask = batch.response_mask[rows]
        width = max(1, int(mask.sum(-1).max().item()))
        pmask = batch.prompt_mask[rows]
        first = int((pmask.sum(0) > 0).nonzero()[0].item()) if pmask.any() else pmask.shape[1] - 1
        yield rows, first, width


def update_student(module: DistillModule, batch: RolloutBatch, sup: Supervision) -> UpdateResult:
    """One optimizer step on the method's supervision, with the configured estimator.

    ``loss.estimator``: ``sampled`` (−w·A·log π_θ(y_t)), ``topk`` (reverse KL over the
    student's top-K candidates) or ``full`` (exact reverse KL over the vocabulary, chunked);
    every form is ``Σ_t w_t ℓ_t / N`` with N the global number of response tokens. A step whose
    inputs, loss or gradient are not finite on any rank makes no update on every rank.
    """
    spec = module.loss_spec
    mask = batch.response_mask
    valid = mask > 0
    advantage = torch.where(valid, sup.advantage.detach(), torch.zeros_like(sup.advantage))
    weight = torch.where(valid, sup.weight.detach(), torch.zeros_like(sup.weight))
    # Numeric guard: padding never carries a NaN into the loss; a non-finite input on a real
    # token on any rank skips the update everywhere (no forward at all).
    inputs = {"advantage": sup.advantage, "weight": sup.weight, **sup.checked}
    bad_local = [k for k, x in inputs.items() if x is not None and not bool(torch.isfinite(x[valid]).all())]
    flags = parallel.all_reduce_max(torch.tensor([float(k in bad_local) for k in inputs]))
    bad = [k for k, f in zip(inputs, flags.tolist()) if f > 0]

    # global N, and how many tokens the method supervises (weight > 0), in one collective
    counts = parallel.all_reduce_sum(torch.stack([mask.sum(), ((weight > 0) & valid).sum().to(mask.dtype)]).detach())
    num_tokens, supervised = counts[0], int(counts[1])
    # DDP and FSDP average gradients over ranks; the loss is a global sum over N, so scale back.
    grad_scale = float(parallel.world_size())
    gather_k = max(spec.topk if spec.estimator == "topk" else 0, sup.candidate_k)
    opt = module.optimizers()
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=module.device)
    gap_sum, gap_n = 0.0, 0
    chunks = [] if bad else list(micro_batches(batch, spec.micro_batch_size))
    for i, (rows, first, width) in enumerate(chunks):
        ids = torch.cat([batch.prompt_ids[rows, first:], batch.response_ids[rows, :width]], 1)
        am = torch.cat([batch.prompt_mask[rows, first:], mask[rows, :width].long()], 1)
        m, w = mask[rows, :width], weight[rows, :width]
        cand = batch.student_topk_ids[rows, :width, :gather_k] if gather_k else None
        with parallel.gradient_sync(module.trainer, enabled=i == len(chunks) - 1):
            scores = parallel.forward_call(
                module.student, score_tokens, ids, am, batch.response_ids[rows, :width], m,
                gather_ids=cand, chunk_size=spec.chunk_size, return_hidden=spec.estimator == "full",
            )
            loss = estimator_loss(module, batch, sup, scores, rows, width, advantage, w, num_tokens)
            if batch.rollout_logprobs is not None:
                diff = (scores.logprobs.detach() - batch.rollout_logprobs[rows, :width]).abs() * m
                gap_sum, gap_n = gap_sum + float(diff.sum()), gap_n + int(m.sum())
            extra = module.extra_loss(sup, scores, rows, width, num_tokens)
            if extra is not None:
                loss = loss + extra
            module.manual_backward(loss * grad_scale)
        total = total + loss.detach()

    total = parallel.all_reduce_sum(total)
    grad_norm = clip_gradients(module)
    if bad:
        total = torch.full((), float("nan"), device=module.device)  # logged: no loss this step
    else:
        bad = [k for k, ok in (("loss", math.isfinite(float(total))), ("gradient", math.isfinite(grad_norm))) if not ok]
    if bad:
        opt.zero_grad(set_to_none=True)  # no gradients: the optimizer step below changes nothing
        module.record_skipped_step(bad, float(total), grad_norm)
    else:
        module.record_good_step()
        if float(num_tokens) == 0:  # nothing to learn on any rank: no update (AdamW's momentum
            opt.zero_grad(set_to_none=True)  # would still move the weights on zero gradients)
    # The step counts either way, so the global step stays the data position (what resume uses).
    opt.step()
    module.lr_schedulers().step()
    gap = None
    if batch.rollout_logprobs is not None:
        sums = parallel.all_reduce_sum(torch.tensor([gap_sum, float(gap_n)]))
        gap = float(sums[0] / sums[1].clamp(min=1))
    return UpdateResult(float(total), grad_norm, bad, supervised, gap)


def estimator_loss(module, batch, sup, scores, rows, width, advantage, weight, num_tokens) -> torch.Tensor:
    """This micro-batch's share of the loss under ``loss.estimator`` (see :func:`update_student`)."""
    spec = module.loss_spec
    m = batch.response_mask[rows, :width]
    valid = m > 0
    if spec.estimator == "sampled":
        adv = advantage[rows, :width]
        train_logp = scores.logprobs.detach()
        if spec.advantage_logprobs == "trainer" and batch.student_logprobs is not None:
            # A = target − log π: rebase the method's advantage onto this forward's log π_θ(y_t)
            adv = adv + (batch.student_logprobs[rows, :width] - train_logp) * valid
        coef_weight = weight
        if spec.rollout_is and batch.rollout_logprobs is not None:
            ratio = truncated_is_weight(train_logp, batch.rollout_logprobs[rows, :width], spec.rollout_is_cap)
            coef_weight = weight * ratio
        return policy_gradient_loss(scores.logprobs, adv, coef_weight, num_tokens)
    lam = sup.teacher_coef
    if spec.estimator == "topk":
        k = spec.topk
        target = batch.teacher_topk_logprobs[rows, :width, :k]
        if lam != 1.0:
            target = lam * target + (1.0 - lam) * batch.ref_topk_logprobs[rows, :width, :k]
        kl = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
        kl[valid] = topk_reverse_kl(scores.topk_logprobs[..., :k][valid], target[valid], spec.topk_renorm)
        return weighted_token_loss(kl, weight, num_tokens)
    # full: the teacher's (and reference's) hidden rows of these tokens, through their heads
    teacher = module.parts.teacher
    sel = valid_rows(batch.response_mask, rows, width)
    targets = [(batch.teacher_hidden[sel], *head_of(teacher.teacher), lam)]
    if lam != 1.0:
        targets.append((batch.ref_hidden[sel], *head_of(teacher.reference), 1.0 - lam))
    head = module.student.get_output_embeddings()
    kl_rows = chunked_reverse_kl(scores.hidden, head, targets, chunk_size=spec.chunk_size)  # [n]
    kl = torch.zeros(m.shape, dtype=kl_rows.dtype, device=m.device)
    kl = kl.masked_scatter(valid, kl_rows)
    return weighted_token_loss(kl, weight, num_tokens)


def valid_rows(mask: torch.Tensor, rows: slice, width: int) -> torch.Tensor:
    """``[n]`` indices into the batch's packed valid rows (``mask > 0`` row-major) of one
    micro-batch's valid tokens."""
    index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    valid = mask > 0
    index[valid] = torch.arange(int(valid.sum()), device=mask.device)
    sub = index[rows, :width]
    return sub[sub >= 0]


def head_of(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's full weight and bias (gathered when the model is sharded)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


def clip_gradients(module) -> float:
    """Clip to ``optim.max_grad_norm`` (0: no clipping); returns the norm before clipping
    (global under DDP/FSDP: every rank sees the same gradients or shards of them)."""
    params = [p for p in module.student.parameters() if p.grad is not None]
    if not params:
        return 0.0
    clip = module.optim_spec.max_grad_norm if module.optim_spec.max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------
# metrics (reduced over ranks)
# ---------------------------------------------------------------------------


@dataclass
class GlobalMetrics:
    """Per-step metrics as ratios of global sums, global maxima and means over ranks,
    reduced in two collectives."""

    ratios: dict[str, tuple[float, float]] = field(default_factory=dict)
    maxima: dict[str, float] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)  # identical on every rank already

    def ratio(self, name: str, num: float, den: float) -> None:
        a, b = self.ratios.get(name, (0.0, 0.0))
        self.ratios[name] = (a + float(num), b + float(den))

    def reduce(self) -> dict[str, float]:
        names = sorted(self.ratios)
        sums = torch.tensor([v for n in names for v in self.ratios[n]], dtype=torch.float64)
        sums = parallel.all_reduce_sum(sums) if names else sums
        out = dict(self.values)
        for i, n in enumerate(names):
            num, den = float(sums[2 * i]), float(sums[2 * i + 1])
            out[n] = num / den if den > 0 else 0.0
        mnames = sorted(self.maxima)
        if mnames:
            mx = parallel.all_reduce_max(torch.tensor([self.maxima[n] for n in mnames], dtype=torch.float64))
            out.update({n: float(v) for n, v in zip(mnames, mx.tolist())})
        return out


def step_metrics(module, batch: RolloutBatch, sup: Supervision, result: UpdateResult, seconds: dict[str, float]) -> dict[str, float]:
    mask = batch.response_mask
    valid = mask > 0
    n_tok = float(mask.sum())
    lengths = mask.sum(-1)
    g = GlobalMetrics()
    g.values.update({
        "train/loss": result.loss,
        "train/grad_norm": result.grad_norm,
        "train/lr": float(module.optimizers().param_groups[0]["lr"]),
        "train/skipped_steps": float(module.skipped_steps),
    })
    adv = torch.where(valid, sup.advantage, torch.zeros_like(sup.advantage))
    g.ratio("train/adv_mean", float(adv.sum()), n_tok)
    g.ratio("train/kept_frac", float(((sup.weight > 0) & valid).sum()), n_tok)
    g.ratio("rollout/response_len_mean", float(lengths.sum()), lengths.numel())
    g.maxima["rollout/response_len_max"] = float(lengths.max())
    g.ratio("teacher/logp_mean", float((batch.teacher_logprobs * mask).sum()), n_tok)
    g.ratio("student/logp_mean", float((batch.student_logprobs * mask).sum()), n_tok)
    if batch.student_entropy is not None:
        g.ratio("student/entropy_mean", float((batch.student_entropy * mask).sum()), n_tok)
    accuracy = rollout_correct(batch)
    if accuracy is not None:
        g.ratio("rollout/accuracy", accuracy, batch.batch_size)
    if result.logprob_gap is not None:
        g.values["rollout/logprob_gap"] = result.logprob_gap
    if batch.release is not None:
        from opd_lit.diagnostics.release_stats import release_metric_sums

        for name, (num, den) in release_metric_sums(batch.release, mask).items():
            g.ratio(name, num, den)
    if batch.segment_ids is not None:  # the segments-per-response distribution, global
        from opd_lit.release import segment_count_stats

        counts = parallel.all_gather_rows(batch.segment_ids.amax(dim=1) + 1)  # [W·B]
        g.values.update(segment_count_stats((counts - 1).unsqueeze(1)))
    for name, value in sup.stats.items():  # the method's own: averaged over ranks
        g.ratio(name, value, 1.0)
    # Stages: the slowest rank's time (the step waits for it); throughput from global tokens.
    for stage, s in seconds.items():
        g.maxima[f"time/{stage}_s"] = s
    g.maxima["rollout/sync_s"] = seconds.get("sync", 0.0)
    out = g.reduce()
    tokens = out["rollout/response_len_mean"] * batch.batch_size * parallel.world_size()
    out["rollout/tokens_per_s"] = tokens / max(out["time/rollout_s"], 1e-9)
    out["teacher/tokens_per_s"] = tokens / max(out["time/teacher_s"], 1e-9)
    return out


def rollout_correct(batch: RolloutBatch) -> float | None:
    """How many of the batch's responses carry the reference answer (None without answers)."""
    answers = [r.get("answer") for r in batch.records]
    if any(a is None for a in answers):
        return None
    from opd_lit.eval.graders import grade_math

    return float(sum(grade_math(t, a) for t, a in zip(batch.response_text, answers)))


# ---------------------------------------------------------------------------
# padding helpers for engine outputs
# ---------------------------------------------------------------------------


def right_pad_float(rows: list[list[float]], shape: torch.Size) -> torch.Tensor:
    """``[B, T]`` float32 from ragged per-token values (0 on padding)."""
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


def pad_topk(rows: list[list[list[int]]], shape: torch.Size, k: int) -> torch.Tensor:
    """``[B, T, K]`` long from ragged per-position candidate lists (0 on padding)."""
    out = torch.zeros((*shape, k), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor([c[:k] for c in r], dtype=torch.long)
    return out
