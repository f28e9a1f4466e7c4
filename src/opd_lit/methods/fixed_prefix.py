"""``method=fixed_prefix``: OPD on the first ``L`` response tokens only (FastOPD-style).

weight = mask · [t < L], A_t is the OPD advantage: the paper's §4.1 ("the standard OPD
objective", supervision halted after a global prefix; no rescaling, which it describes for
the release rule only). Tables 1 and 3 use this one definition (Table 3's FastOPD is
Table 1's L = 2048, §4.5). Variants: ``method.rescale=true`` scales the kept tokens by total /
kept mass per sample, as the release rule does; ``method.truncate_generation=true`` also
stops the rollouts at ``L`` new tokens (FastOPD's own setting: nothing is generated past the
supervised prefix). ``method.schedule=linear`` grows ``L`` from ``start_len`` at the first
step to ``prefix_len`` at the last (``trainer.max_steps``).
"""

from __future__ import annotations

from opd_lit.methods.base import DistillModule, Supervision
from opd_lit.methods.functional import SCHEDULES, prefix_weight, scheduled_prefix_len


def _positive_int(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{key}={value!r}: allowed is an integer >= 1 (a number of response tokens)"
        )
    return value


class FixedPrefix(DistillModule):
    name = "fixed_prefix"

    def __init__(
        self,
        prefix_len: int = 48,
        truncate_generation: bool = False,
        schedule: str = "constant",
        start_len: int | None = None,
        rescale: bool = False,
        **kwargs,
    ):
        prefix_len = _positive_int("method.prefix_len", prefix_len)
        if schedule not in SCHEDULES:
            raise ValueError(f"method.schedule={schedule!r} is not one of {list(SCHEDULES)}")
        if start_len is None:
            if schedule == "linear":
                raise ValueError(
                    "method.start_len=None: method.schedule=linear needs the first prefix length "
                    f"(allowed: an integer 1 <= start_len <= method.prefix_len={prefix_len})"
                )
            start_len = prefix_len
        start_len = _positive_int("method.start_len", start_len)
        if start_len > prefix_len:
            raise ValueError(
                f"method.start_len={start_len}: allowed is 1 <= start_len <= "
                f"method.prefix_len={prefix_len} "
                "(the linear schedule grows L from start_len to prefix_len)"
            )
        flags = (("method.truncate_generation", truncate_generation), ("method.rescale", rescale))
        for key, value in flags:
            if not isinstance(value, bool):
                raise ValueError(f"{key}={value!r}: allowed is true or false")
        super().__init__(**kwargs)
        self.prefix_len = prefix_len
        self.truncate_generation = truncate_generation
        self.schedule = schedule
        self.start_len = start_len
        self.rescale = rescale

    def current_prefix_len(self) -> int:
        """``L`` for this step (the schedule reads the trainer's global step)."""
        trainer = self._trainer
        step = int(trainer.global_step) if trainer is not None else 0
        total = int(trainer.max_steps) if trainer is not None and trainer.max_steps > 0 else 1
        return scheduled_prefix_len(step, total, self.start_len, self.prefix_len, self.schedule)

    def generation_limit(self, default: int) -> int:
        if self.truncate_generation:
            return min(int(default), self.current_prefix_len())
        return default

    def supervise(self, batch) -> Supervision:
        advantage = self.opd_advantage(batch)  # [B, T]
        length = self.current_prefix_len()
        weight, _ = prefix_weight(batch.response_mask, length, self.rescale)  # [B, T]
        return Supervision(advantage, weight, {"fixed_prefix/prefix_len": float(length)})
