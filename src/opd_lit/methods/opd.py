"""``method=opd``: full on-policy distillation.

A_t = log p_T(y_t) − log p_S(y_t) on every response token; weight = response mask.
"""

from opd_lit.methods.base import DistillModule, Supervision


class OPD(DistillModule):
    name = "opd"

    def supervise(self, batch) -> Supervision:
        advantage = self.opd_advantage(batch)  # [B, T]
        return Supervision(advantage, batch.response_mask.clone())
