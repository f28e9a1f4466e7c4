"""The entry point imports only what every run uses: the optional parts of a run (MLflow,
vLLM, datasets, NLTK, the graders, plotting) load when a run asks for them."""

from __future__ import annotations

import json
import subprocess
import sys

LAZY = ["mlflow", "vllm", "datasets", "nltk", "math_verify", "trl"]


def test_train_entry_point_leaves_optional_packages_unimported():
    code = (
        "import json, sys; import opd_lit.train, opd_lit.step, opd_lit.rollout; "
        f"print(json.dumps([m for m in {LAZY!r} if m in sys.modules]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
