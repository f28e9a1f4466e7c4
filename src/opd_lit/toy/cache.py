"""Where the toy models live: the shipped assets, else a content-addressed cache.

``toy_model_dir(role)`` returns

1. ``opd_lit/toy/assets/<role>`` when ``assets/manifest.json`` carries the current
   recipe hash and every listed file's sha256 verifies;
2. else ``$OPD_LIT_CACHE/toy/<recipe_hash>/<role>`` (default cache ``~/.cache/opd_lit``)
   when its manifest ``<role>.manifest.json`` verifies the same way;
3. else it builds the role there (a few minutes on a laptop CPU) and returns it.

The manifest format (shipped ``manifest.json``; the cache keeps one per role):
``recipe_version``, ``recipe_hash``, ``recipe``, ``files`` {relative path: sha256},
``<role>_accuracy``, ``train_seconds`` {role: s}, ``roles`` {role: details}, versions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from opd_lit.settings import sha256_file

from .recipe import ROLES, Recipe, recipe_hash

__all__ = [
    "ASSETS_DIR",
    "MANIFEST_NAME",
    "REQUIRED_FILES",
    "ToyAssetError",
    "cache_root",
    "cache_dir",
    "sha256_file",
    "hash_files",
    "verify_manifest",
    "verify_assets",
    "toy_model_dir",
]

log = logging.getLogger("opd_lit.toy")

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MANIFEST_NAME = "manifest.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


class ToyAssetError(ValueError):
    """A toy model directory or manifest is missing, stale or corrupted."""


def cache_root() -> Path:
    return Path(os.environ.get("OPD_LIT_CACHE") or Path.home() / ".cache" / "opd_lit")


def cache_dir(recipe: Recipe | None = None) -> Path:
    return cache_root() / "toy" / recipe_hash(recipe)


def hash_files(root: Path, role: str) -> dict[str, str]:
    """{``<role>/<file>``: sha256} for every file under ``root/<role>`` (sorted)."""
    base = Path(root) / role
    out = {}
    for p in sorted(base.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ToyAssetError(f"no toy manifest at {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ToyAssetError(f"unreadable toy manifest {path}: {e}") from e


def verify_manifest(
    root: Path,
    manifest: dict[str, Any],
    roles: Iterable[str] = ROLES,
    recipe: Recipe | None = None,
    check_recipe: bool = True,
) -> None:
    """Raise ``ToyAssetError`` unless ``manifest`` matches ``recipe`` and the files in ``root``.

    Every listed file of the roles must exist with its sha256; each role must list the
    ``REQUIRED_FILES``; no unlisted file may sit in a role directory.
    """
    root = Path(root)
    if check_recipe:
        want = recipe_hash(recipe)
        got = manifest.get("recipe_hash")
        if got != want:
            raise ToyAssetError(
                f"recipe hash mismatch in {root}: manifest has {got}, current recipe is {want}"
            )
    files: dict[str, str] = manifest.get("files") or {}
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown toy role {role!r}; allowed roles: {', '.join(ROLES)}")
        listed = {k: v for k, v in files.items() if k.split("/", 1)[0] == role}
        for name in REQUIRED_FILES:
            if f"{role}/{name}" not in listed:
                raise ToyAssetError(f"manifest of {root} does not list {role}/{name}")
        for rel, digest in sorted(listed.items()):
            path = root / rel
            if not path.is_file():
                raise ToyAssetError(f"missing toy asset file {rel} in {root}")
            actual = sha256_file(path)
            if actual != digest:
                raise ToyAssetError(
                    f"sha256 mismatch for toy asset file {rel} in {root}: "
                    f"expected {digest}, found {actual}"
                )
        role_dir = root / role
        for p in role_dir.rglob("*"):
            if p.is_file() and p.relative_to(root).as_posix() not in listed:
                raise ToyAssetError(f"unlisted file {p.relative_to(root).as_posix()} in {root}")


def verify_assets(
    root: Path | str = ASSETS_DIR,
    roles: Iterable[str] = ROLES,
    recipe: Recipe | None = None,
    check_recipe: bool = True,
) -> dict[str, Any]:
    """Verify a shipped-style asset directory (``root/manifest.json``); return the manifest."""
    root = Path(root)
    manifest = _read_manifest(root / MANIFEST_NAME)
    verify_manifest(root, manifest, roles, recipe, check_recipe)
    return manifest


def _verify_cached(root: Path, role: str, recipe: Recipe | None) -> dict[str, Any]:
    manifest = _read_manifest(root / f"{role}.manifest.json")
    verify_manifest(root, manifest, [role], recipe)
    return manifest


def toy_model_dir(role: str, recipe: Recipe | None = None, build: bool = True) -> Path:
    """Directory of the toy ``role`` ("teacher" or "student"): a complete local HF model.

    Loadable with ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` (the tokenizer carries the role's chat template).
    With ``build=False`` a missing model raises ``ToyAssetError`` instead of building.
    """
    if role not in ROLES:
        raise ValueError(f"unknown toy role {role!r}; allowed roles: {', '.join(ROLES)}")
    try:
        verify_assets(ASSETS_DIR, [role], recipe)
        return ASSETS_DIR / role
    except ToyAssetError as e:
        shipped_problem = str(e)
    root = cache_dir(recipe)
    try:
        _verify_cached(root, role, recipe)
        return root / role
    except ToyAssetError as e:
        cache_problem = str(e)
    if not build:
        raise ToyAssetError(
            f"no verified toy {role}: shipped: {shipped_problem}; cache: {cache_problem}"
        )
    from .build import build_into_cache  # heavy (torch); only when building

    log.warning(
        "building toy %s into %s (takes a few minutes) because the shipped assets do not "
        "match (%s) and the cache has none (%s)",
        role,
        root / role,
        shipped_problem,
        cache_problem,
    )
    build_into_cache(role, recipe)
    _verify_cached(root, role, recipe)
    return root / role
