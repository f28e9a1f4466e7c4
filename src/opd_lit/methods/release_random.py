"""``method=release_random``: the random-release control of "Prefix Teach, Suffix Fade".

§4.1: random release "preserves the batch-level release point distribution" of the BIC rule
but permutes the release points across samples; §4.3: it tests whether the gain comes from
the volume of supervision. The BIC release points of the batch are computed exactly as
``release_bic`` does, then moved between samples by :func:`permute_release_points`:

- ``method.permute=relative`` (default): the relative release point (release token / length;
  1 = nothing released) moves, within strata of ``method.stratum_size`` samples of similar
  length, and is put back on the receiving response's length. The released fraction is
  exactly the rule's, and the kept-token fraction stays within a fraction of a point of it.
- ``method.permute=absolute``: the token position moves and is clipped to the receiving
  length (with ``stratum_size: null``, the first version of this control: on long-tailed
  lengths it releases fewer samples and keeps fewer tokens than the rule it controls for).

The kept prefix gets the release rule's mass-preserving rescale. Seed: ``method.seed``
(default null: the run's ``seed``) mixed with the global step.
"""

from __future__ import annotations

import torch

from opd_lit.methods.base import DistillModule, Supervision
from opd_lit.methods.functional import PERMUTE_MODES, derive_seed, permute_release_points
from opd_lit.parallel import all_gather_rows, local_rows
from opd_lit.release import apply_release_tokens


class ReleaseRandom(DistillModule):
    name = "release_random"
    uses_release = True

    def __init__(
        self,
        seed: int | None = None,
        permute: str = "relative",
        stratum_size: int | None = 32,
        **kwargs,
    ):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(
                f"method.seed={seed!r}: allowed is null (derive from the run seed) "
                "or an integer >= 0"
            )
        if permute not in PERMUTE_MODES:
            raise ValueError(f"method.permute={permute!r}: allowed is one of {list(PERMUTE_MODES)}")
        if stratum_size is not None and (
            isinstance(stratum_size, bool) or not isinstance(stratum_size, int) or stratum_size < 2
        ):
            raise ValueError(
                f"method.stratum_size={stratum_size!r}: allowed is null (one stratum: the whole "
                "batch) or an integer >= 2 (samples per length stratum)"
            )
        super().__init__(**kwargs)
        self.seed = seed
        self.permute = permute
        self.stratum_size = stratum_size

    def generator(self) -> torch.Generator:
        trainer = self._trainer
        step = int(trainer.global_step) if trainer is not None else 0
        base = self.seed
        if base is None:
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            base = int(getattr(dm, "seed", 0) or 0)
        return torch.Generator().manual_seed(derive_seed(base, step))

    def supervise(self, batch) -> Supervision:
        advantage = self.opd_advantage(batch)  # [B, T]
        release = self.release_decision(batch, advantage)
        mask = batch.response_mask
        lengths = mask.sum(-1).long()  # [B]
        # Across the global batch: every rank gathers all ranks' release points and lengths
        # ([W·B]), applies the same seeded permutation, and keeps its own rows.
        moved = local_rows(permute_release_points(
            all_gather_rows(release.release_token.long()), all_gather_rows(lengths),
            self.generator(), self.permute, self.stratum_size,
        ))  # [B], length where nothing is released
        weight, _, _ = apply_release_tokens(mask, moved)  # [B, T]
        nonempty = lengths > 0
        stats = {}
        if bool(nonempty.any()):
            stats["release_random/release_pos_frac"] = float(
                (moved[nonempty].float() / lengths[nonempty].float()).mean()
            )
            stats["release_random/released_frac"] = float(
                (moved[nonempty] < lengths[nonempty]).float().mean()
            )
        return Supervision(advantage, weight, stats)
