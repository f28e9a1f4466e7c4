"""``method=lgr``: Lookahead Group Reward (arXiv 2605.30833).

Trigger: response positions where the student's entropy H(π_S(· | y_<t)) > τ (``method.tau``).
Candidates: the student's top-K ids there (``method.k``). The TeacherCallback branches every
candidate c in one tree-attention forward over its cached prefill (:mod:`opd_lit.lookahead`):

    r_raw(c)  = max_v p_T(v | x, y_<t, c)
    r_conf(c) = (r_raw(c) − mean_K r_raw) / (std_K r_raw + ε)        (population std, ε = 1e-6)

``method.variant=sampled`` (default, the single-sample estimator):

    A_t = (log p_T(y_t) − log p_S(y_t)) + γ · r_conf(y_t)   on triggered t with y_t a candidate,
    A_t =  log p_T(y_t) − log p_S(y_t)                       elsewhere; weight = response mask.

``method.variant=topk`` keeps A_t = OPD and adds, on triggered positions, the exact expectation
over the K candidates under the student's distribution renormalised to them,
π̄(c_k) = π_S(c_k) / Σ_j π_S(c_j):

    loss += −(1/N) Σ_t w_t · γ · Σ_k π̄_θ(c_k) · r_conf(c_k)

(N = response tokens in the batch; r_conf is 0 off trigger), whose gradient is
Σ_k π̄_k · γ·r_conf(c_k) · ∇log π̄_k: every candidate moves by its group reward, weighted by
the student's own probability (:func:`opd_lit.lookahead.expected_group_reward_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from opd_lit.lookahead import expected_group_reward_loss, group_normalise, sampled_candidate_reward
from opd_lit.methods.base import DistillModule, Lookahead, Needs, Supervision

VARIANTS = ("sampled", "topk")


def _finite_nonneg(key: str, value) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key}={value!r}: allowed is a finite number >= 0")
    return float(value)


def _int_at_least(key: str, value, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{key}={value!r}: allowed is an integer >= {low} ({what})")
    return value


@dataclass
class LGRSupervision(Supervision):
    candidate_reward: torch.Tensor | None = None  # [B, T, K]  γ·r_conf of each candidate (topk variant)


class LGR(DistillModule):
    name = "lgr"

    def __init__(
        self,
        k: int = 8,
        tau: float = 0.2,
        gamma: float = 1.0,
        variant: str = "sampled",
        segments: int = 8,
        **kwargs,
    ):
        k = _int_at_least("method.k", k, 2, "the group normalisation needs at least 2 candidates")
        tau = _finite_nonneg("method.tau", tau)
        gamma = _finite_nonneg("method.gamma", gamma)
        segments = _int_at_least(
            "method.segments", segments, 1, "branch forwards per teacher micro-batch"
        )
        if variant not in VARIANTS:
            raise ValueError(f"method.variant={variant!r} is not one of {list(VARIANTS)}")
        super().__init__(**kwargs)
        if variant == "sampled" and self.loss_spec.estimator != "sampled":
            raise ValueError(
                f"method.variant=sampled with loss.estimator={self.loss_spec.estimator}: the sampled "
                "variant adds its reward to the sampled token's advantage; allowed: "
                "loss.estimator=sampled, or method.variant=topk with any estimator"
            )
        self.k, self.tau, self.gamma, self.variant, self.segments = k, tau, gamma, variant, segments

    @property
    def needs(self) -> Needs:
        return Needs(
            topk=self.k, entropy=True,
            lookahead=Lookahead(k=self.k, tau=self.tau, segments=self.segments),
        )

    def supervise(self, batch) -> Supervision:
        look = batch.lookahead
        if look is None:
            raise RuntimeError(
                "lgr: the batch has no teacher lookahead (needs.lookahead was not honoured)"
            )
        mask = batch.response_mask
        advantage = self.opd_advantage(batch)  # [B, T]
        cand = batch.student_topk_ids[..., : self.k]  # [B, T, K]
        trigger = look.trigger  # [B, T]
        r_conf = group_normalise(look.r_raw[..., : self.k]) * trigger.unsqueeze(-1)  # [B, T, K]
        reward, hit = sampled_candidate_reward(r_conf, cand, batch.response_ids, trigger)  # [B, T]

        valid = mask > 0
        n_valid = max(1, int(valid.sum()))
        n_trig = int(trigger.sum())
        stats = {
            "lgr/trigger_frac": n_trig / n_valid,
            "lgr/hit_frac": float(hit.sum()) / max(1, n_trig),
            "lgr/r_conf_abs_mean": float(reward.abs().sum()) / max(1, int(hit.sum())),
            "lgr/r_raw_mean": float(look.r_raw[trigger].mean()) if n_trig else 0.0,
            "lgr/teacher_calls": float(look.teacher_calls),
            "lgr/branch_tokens": float(look.branch_tokens),
        }
        weight = mask.clone()
        if self.variant == "sampled":
            return Supervision(advantage + self.gamma * reward, weight, stats)
        cand_reward = (self.gamma * r_conf).to(torch.float32)  # [B, T, K]
        return LGRSupervision(
            advantage, weight, stats, candidate_k=self.k,
            checked={"candidate_reward": cand_reward}, candidate_reward=cand_reward,
        )

    def extra_loss(self, sup, scores, rows, width, num_tokens):
        """The topk variant's term: −γ·Σ_k π̄_θ(c_k)·r_conf(c_k) per triggered position."""
        if not isinstance(sup, LGRSupervision) or sup.candidate_reward is None:
            return None
        return expected_group_reward_loss(
            scores.topk_logprobs[..., : self.k], sup.candidate_reward[rows, :width],
            sup.weight[rows, :width], num_tokens,
        )
