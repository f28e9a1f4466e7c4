"""``method=exopd``: reward-extrapolated OPD (G-OPD / ExOPD).

A_t = λ·log p_T(y_t) + (1 − λ)·log p_ref(y_t) − log p_S(y_t), weight = response mask.
p_ref is a frozen reference model scored by the TeacherCallback on the student's view of the
rollout: ``method.reference=student_init`` (the initial student, reloaded from its path) or a
local Hugging Face model directory. λ = 1 is OPD, λ > 1 (default 1.25) extrapolates the
teacher's reward beyond the reference.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from opd_lit.methods.base import DistillModule, Needs, Supervision
from opd_lit.methods.functional import exopd_advantage
from opd_lit.models import TOY_PREFIX
from opd_lit.objectives import masked_mean

STUDENT_INIT = "student_init"


def check_reference(reference: str) -> str:
    """``student_init``, ``toy:<role>`` or an existing local model directory, else ValueError."""
    ref = str(reference)
    if ref == STUDENT_INIT or ref.startswith(TOY_PREFIX):
        return ref
    path = Path(ref).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        why = "does not exist" if not path.exists() else "has no config.json"
        raise ValueError(
            f"method.reference={ref!r}: {why}. Allowed: {STUDENT_INIT!r} (a frozen copy of the "
            "initial student) or a local Hugging Face model directory with config.json."
        )
    return ref


class ExOPD(DistillModule):
    name = "exopd"

    def __init__(self, lam: float = 1.25, reference: str = STUDENT_INIT, **kwargs):
        number = isinstance(lam, (int, float)) and not isinstance(lam, bool)
        if not number or not math.isfinite(lam) or lam < 0:
            raise ValueError(
                f"method.lam={lam!r}: allowed is a finite number >= 0 (1 = OPD, default 1.25)"
            )
        reference = check_reference(reference)
        super().__init__(**kwargs)
        self.lam = float(lam)
        self.reference = reference

    @property
    def needs(self) -> Needs:
        return dataclasses.replace(super().needs, reference=self.reference)  # [B, T] ref log-probs

    def supervise(self, batch) -> Supervision:
        if batch.ref_logprobs is None:
            raise RuntimeError(
                "exopd: the batch has no reference log-probs (needs.reference was not honoured)"
            )
        mask = batch.response_mask
        advantage = exopd_advantage(
            batch.teacher_logprobs, batch.ref_logprobs, batch.student_logprobs, mask, self.lam
        )  # [B, T]
        stats = {"exopd/ref_logp_mean": float(masked_mean(batch.ref_logprobs, mask))}
        return Supervision(advantage, mask.clone(), stats, teacher_coef=self.lam)
