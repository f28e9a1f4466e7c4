"""Helpers for the reliability tests: a tiny random student/teacher pair on the toy tokenizer.

The fault tests need real model directories (config.json, weights, a tokenizer with a chat
template) but not trained ones, and they must not wait for (or build) the shipped toy
models. ``tiny_pair`` writes two random 1-layer Qwen3 models that share the toy tokenizer
(student and teacher chat templates) once per session.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from e2e import REPO

TINY_OVERRIDES = [
    "trainer.max_steps=6",
    "rollout.prompts_per_step=2",
    "rollout.max_new_tokens=12",
    "rollout.gen_batch_size=8",
    "data.num_train=32",
    "eval.at_start=false",
    "eval.at_end=false",
    "eval.teacher_at_start=false",
    "eval.num_problems=2",
    "diagnostics.enabled=false",
    "progress=false",
    "export.final_model=false",
]


def write_tiny_model(tokenizer, role: str, target: Path, layers: int, seed: int) -> Path:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from opd_lit.toy.tokenizer import IM_END, PAD_TOKEN

    torch.manual_seed(seed)
    vocab = ((len(tokenizer) + 7) // 8) * 8
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )
    model = Qwen3ForCausalLM(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    GenerationConfig(
        bos_token_id=None, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
    ).save_pretrained(target)
    return target


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    from opd_lit.toy.build import build_tokenizer
    from opd_lit.toy.recipe import default_recipe

    recipe = default_recipe()
    student = write_tiny_model(build_tokenizer(recipe, "student"), "student", root / "student", 1, 0)
    teacher = write_tiny_model(build_tokenizer(recipe, "teacher"), "teacher", root / "teacher", 2, 1)
    return student, teacher


def pair_overrides(student: Path, teacher: Path) -> list[str]:
    return [f"student.path={student}", f"teacher.path={teacher}", *TINY_OVERRIDES]


# ---- subprocess runs -----------------------------------------------------------------

# A training process that sleeps a little in every step (so a test can signal it mid-run).
DRIVER = """
import os, sys, time
delay = float(os.environ.get("OPD_TEST_STEP_DELAY", "0"))
if delay:
    from opd_lit.teacher import TeacherCallback
    _orig = TeacherCallback.on_train_batch_start
    def _slow(self, trainer, pl_module, batch, batch_idx):
        time.sleep(delay)
        return _orig(self, trainer, pl_module, batch, batch_idx)
    TeacherCallback.on_train_batch_start = _slow
if os.environ.get("OPD_TEST_SKIP_RNG_RESTORE"):  # only to show the resume test would notice
    import opd_lit.checkpoint as ck
    ck.restore_rng = lambda *a, **k: None
from opd_lit.train import main
main()
"""


def driver(tmp: Path) -> Path:
    path = tmp / "driver.py"
    path.write_text(DRIVER)
    return path


def env(extra: dict | None = None) -> dict:
    e = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    e.update(extra or {})
    return e


def start(tmp: Path, cwd: Path, args: list[str], delay: float = 0.0) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    log_path = cwd / f"log-{time.time_ns()}.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(driver(tmp)), *args],
            cwd=cwd, env=env({"OPD_TEST_STEP_DELAY": str(delay)}), stdout=log, stderr=subprocess.STDOUT,
            text=True,
        )
    proc.log_path = log_path
    return proc


def output(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(every)
    return False


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.stem[5:]) for p in ckpt_dir.glob("step-*.json"))


def step_metrics(db: Path, key: str, experiment: str = "opd_lit") -> dict[int, float]:
    """{step: value} of one metric of the experiment's only run (the last write of a step wins)."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "SELECT m.step, m.value, m.is_nan FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid "
            "JOIN experiments e ON r.experiment_id = e.experiment_id WHERE e.name = ? AND m.key = ? "
            "ORDER BY m.timestamp, m.rowid",
            (experiment, key),
        ).fetchall()
    finally:
        con.close()
    out: dict[int, float] = {}
    for step, value, is_nan in rows:
        out[int(step)] = float("nan") if is_nan else float(value)
    return out


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, sig)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# ---- fixtures (import them into a test module to use them) ----------------------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_pair(tmp_path_factory.mktemp("tiny_pair"))


# ---- read-only files and directories ----------------------------------------------------------

from contextlib import contextmanager  # noqa: E402


@contextmanager
def read_only(*paths: Path):
    """Make ``paths`` read-only for this process, also as root (where permission bits do not
    bind): the write bits are cleared, and as root the immutable flag is set (``chattr +i``;
    ext4 and most local file systems). Restored on exit. Skips the test as root on a file
    system without the flag, where nothing can make a path read-only for root."""
    modes = {p: p.stat().st_mode for p in paths}
    immutable = []
    try:
        for p in paths:
            p.chmod(modes[p] & ~0o222)
            if os.geteuid() == 0:
                if subprocess.run(["chattr", "+i", str(p)], capture_output=True).returncode != 0:
                    pytest.skip("running as root on a file system without chattr +i: nothing is read-only for root")
                immutable.append(p)
        yield
    finally:
        for p in immutable:
            subprocess.run(["chattr", "-i", str(p)], capture_output=True)
        for p, mode in modes.items():
            p.chmod(mode)
