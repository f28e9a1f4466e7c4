"""opd_lit: strong-to-weak on-policy distillation experiments on Lightning + Hydra + MLflow."""

__version__ = "0.1.0"
