"""``method=release_random``: the random-release control of "Prefix Teach, Suffix Fade".

The BIC release points of the batch are computed exactly as ``release_bic`` does (token
positions; no release = the batch width), then permuted across the batch's samples with a
seeded generator, clipped to each response's length and applied with the same mass-preserving
rescale. Same distribution of release lengths, decoupled from each trajectory's own signal.
Seed: ``method.seed`` (default null: the run's ``seed``) mixed with the global step.
"""

from __future__ import annotations

import torch

from opd_lit.methods.base import DistillModule, Supervision
from opd_lit.methods.functional import clip_release_tokens, derive_seed, permute_release_tokens
from opd_lit.release import apply_release_tokens


class ReleaseRandom(DistillModule):
    name = "release_random"
    uses_release = True

    def __init__(self, seed: int | None = None, **kwargs):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(
                f"method.seed={seed!r}: allowed is null (derive from the run seed) "
                "or an integer >= 0"
            )
        super().__init__(**kwargs)
        self.seed = seed

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
        moved = permute_release_tokens(release.release_token, self.generator())  # [B]
        clipped = clip_release_tokens(moved, lengths)  # [B]
        weight, _, _ = apply_release_tokens(mask, clipped)  # [B, T]
        nonempty = lengths > 0
        stats = {}
        if bool(nonempty.any()):
            stats["release_random/release_pos_frac"] = float(
                (clipped[nonempty].float() / lengths[nonempty].float()).mean()
            )
            stats["release_random/released_frac"] = float(
                (clipped[nonempty] < lengths[nonempty]).float().mean()
            )
        return Supervision(advantage, weight, stats)
