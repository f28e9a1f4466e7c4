"""Supervision methods: LightningModules on one base, each overriding ``supervise()``."""

from opd_lit.methods.base import DistillModule, Lookahead, Needs, Supervision
from opd_lit.methods.exopd import ExOPD
from opd_lit.methods.fixed_prefix import FixedPrefix
from opd_lit.methods.lgr import LGR
from opd_lit.methods.opd import OPD
from opd_lit.methods.release_bic import ReleaseBIC
from opd_lit.methods.release_random import ReleaseRandom

METHODS: dict[str, type[DistillModule]] = {
    cls.name: cls for cls in (OPD, ExOPD, FixedPrefix, ReleaseRandom, ReleaseBIC, LGR)
}

__all__ = [
    "LGR",
    "METHODS",
    "OPD",
    "DistillModule",
    "ExOPD",
    "FixedPrefix",
    "Lookahead",
    "Needs",
    "ReleaseBIC",
    "ReleaseRandom",
    "Supervision",
]
