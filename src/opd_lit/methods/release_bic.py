"""``method=release_bic``: "Prefix Teach, Suffix Fade" — OPD up to a per-rollout release point.

The teacher's top-1/top-2 margin among the student's top-K candidates (``release.top_k``) is
averaged per sentence, and a profiled RSS-BIC test finds a downward change point; tokens after
it get no weight and the kept prefix is rescaled to keep each sample's loss mass
(:mod:`opd_lit.release`). ``release.signal=adv_std`` scores segments by the spread of the
advantage instead (the Table 2 variant).
"""

from opd_lit.methods.base import DistillModule, Supervision


class ReleaseBIC(DistillModule):
    name = "release_bic"
    uses_release = True

    def supervise(self, batch) -> Supervision:
        advantage = self.opd_advantage(batch)  # [B, T]
        release = self.release_decision(batch, advantage)
        return Supervision(advantage, release.weight)
