"""Supervision methods: LightningModules on one base, each overriding ``supervise()``."""

from opd_lit.methods.base import DistillModule, Needs, Supervision
from opd_lit.methods.opd import OPD
from opd_lit.methods.release_bic import ReleaseBIC

METHODS: dict[str, type[DistillModule]] = {cls.name: cls for cls in (OPD, ReleaseBIC)}

__all__ = ["METHODS", "OPD", "DistillModule", "Needs", "ReleaseBIC", "Supervision"]
