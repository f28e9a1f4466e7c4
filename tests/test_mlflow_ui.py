"""`make ui` serves the runs: start the MLflow UI on a free local port and read them back."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_runs_over_rest(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("opd_lit")
    for method in ("opd", "release_bic"):
        run = client.create_run(exp, tags={"method": method, "seed": "0", "sweep": "toy_smoke"})
        client.log_metric(run.info.run_id, "train/loss", 0.5, step=0)
        client.set_terminated(run.info.run_id)
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        body = json.dumps({"experiment_ids": [exp], "filter": "tags.sweep = 'toy_smoke'"}).encode()
        deadline = time.time() + 90
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search", data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=5) as resp:
                    data = json.loads(resp.read())
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"MLflow UI did not come up: {proc.stderr.read().decode()[-2000:] if proc.poll() is not None else 'timeout'}") from None
                time.sleep(1)
        methods = sorted(
            next(t["value"] for t in r["data"]["tags"] if t["key"] == "method") for r in data["runs"]
        )
        assert methods == ["opd", "release_bic"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
