"""Small helpers shared across the package: dataclass specs from config sections, run
directories, file hashes."""

from __future__ import annotations

import hashlib
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def spec_from(cls: type[T], values: dict[str, Any] | None, section: str) -> T:
    """``cls(**values)`` for a dataclass, naming the section and the allowed keys on an unknown one."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{section}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)


def run_output_dir(cfg, fallback_root: str = "outputs") -> Path:
    """``output_dir`` if set, else Hydra's run directory, else ``fallback_root/DATE/TIME``; created."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("output_dir"):
        path = Path(cfg.output_dir)
    elif HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path(fallback_root) / time.strftime("%Y-%m-%d/%H-%M-%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in ``block``-byte pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()
