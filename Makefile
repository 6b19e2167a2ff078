# towerrec — one command each for setup, run, test, bench.
#   make run            set up (if needed) and train the embedded default config
#   make test           set up (if needed) and run the test suite
#   make bench          set up and run the benchmarks (writes benchmarks/results/)
#   make setup DEVICE=cuda   install the CUDA build of fbgemm-gpu instead of the CPU one
PYTHON ?= python3.11
VENV ?= .venv
DEVICE ?= cpu
CONFIG ?= configs/default.yaml
ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.towerrec-$(DEVICE)-setup-v2

ifeq ($(DEVICE),cuda)
FBGEMM := fbgemm-gpu==1.8.0
else
FBGEMM := fbgemm-gpu-cpu==1.8.0
endif

.PHONY: setup run test test-fast bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, exactly pinned: fbgemm-gpu/torchrec 1.8.x are built against torch 2.13.
	$(PY) -m pip install -q torch==2.13.0
	# torchmetrics must be pinned in the same install as lightning (torchrec.metrics breaks on >=1.1).
	$(PY) -m pip install -q $(FBGEMM) torchmetrics==1.0.3 lightning==2.6.6 "pyarrow>=15" "numpy>=1.26" \
		"pyyaml>=6" tensordict pyre-extensions iopath tqdm "faiss-cpu>=1.8" \
		"pytest>=8" "hypothesis>=6" "ruff>=0.5" "scikit-learn>=1.4" "matplotlib>=3.8" "tensorboard>=2.15"
	# torchrec's metadata requires the CUDA fbgemm-gpu; on CPU we provide fbgemm-gpu-cpu instead.
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torchrec, fbgemm_gpu, lightning, pyarrow; print('stack ok: torchrec', torchrec.__version__)"
	touch $(STAMP)

run: setup
	$(VENV)/bin/towerrec fit --config $(CONFIG) $(ARGS)

# pytest exits 5 when it collects no tests: treat that as a failure, not as "nothing to do".
test: setup
	@$(PY) -m pytest -q $(ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" $(ARGS)

bench: setup
	$(PY) -m benchmarks.run_all $(ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean:
	rm -rf runs .pytest_cache
