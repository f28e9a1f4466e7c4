# opd_lit: the two set-up commands are `make setup` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
ARGS   ?=
SWEEP  ?= toy_smoke
PORT   ?= 5000
MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db

GPU_PYTHON ?= python3
GPU_OUT    ?= gpu_check.json

.PHONY: setup test train sweep ui bench gpu-check lint toy clean

setup:  ## create .venv with everything (CPU torch first), offline NLTK data, verify the toy models
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__, 'transformers', transformers.__version__, 'vllm', vllm.__version__)"
	$(BIN)/pip install -q --no-deps -e .
	$(PY) -m opd_lit.release.segment --install-punkt
	$(PY) -m opd_lit.toy.build --verify

test:  ## the whole suite (CPU, no network)
	$(PY) -m pytest -q --durations=25

train:  ## one run: make train ARGS="method=opd seed=1"
	$(PY) -m opd_lit.train $(ARGS)

sweep:  ## a multirun sweep from sweeps/: make sweep SWEEP=toy_smoke
	$(PY) -m opd_lit.train -m --config-dir sweeps --config-name $(SWEEP) $(ARGS)

ui:  ## MLflow UI over the runs, on 127.0.0.1
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(PORT)

bench:  ## speed and memory figures as one JSON object
	$(PY) -m opd_lit.bench $(ARGS)

gpu-check:  ## on one H100/H200 (<= 8 min): 1.7B-shape FSDP2 bf16 step (tokens/s, MFU), 16k-token scoring vs full logits, rollout engines -> $(GPU_OUT)
	PYTHONPATH=src $(GPU_PYTHON) -m opd_lit.bench bench.size=1p7b bench.parts=rollout,score,train,fsdp bench.reps=2 bench.out=$(GPU_OUT)

lint:
	$(BIN)/ruff check src tests

toy:  ## rebuild the shipped toy teacher/student (about 20 minutes on 2 cores)
	$(PY) -m opd_lit.toy.build --ship

clean:
	rm -rf outputs multirun .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
