# Two commands do all set-up on a fresh machine:
#   make demo   installs everything, runs the EVAS kappa study (smoke profile, embedded data) and its report
#   make test   installs everything and runs the test suite (what CI runs), then reruns the
#               outcome-marked tests on PyTorch's portable CPU kernels
#   make ui     the MLflow UI on http://127.0.0.1:5000 for the default workdir's runs
#               (WORKDIR=path for another; PORT=5001 for another port)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench lint clean ui

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/nasrisk run evas-kappa --profile smoke

# The suite, then the outcome tests (trained/attacked results whose float trajectory depends on
# the CPU kernels PyTorch picks by instruction set) again on the portable kernels, so a threshold
# tuned on one CPU fails here before it fails on a user's. Exit 5 = none collected: not an error.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" -q
	@echo "== outcome tests again under ATEN_CPU_CAPABILITY=default =="
	ATEN_CPU_CAPABILITY=default $(BIN)/python -m pytest -m "outcome and not slow and not gpu" -q \
		|| test $$? -eq 5

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m "slow" -q

bench: $(STAMP)
	$(BIN)/python bench/bench_runner.py
	$(BIN)/python bench/bench_kappa.py
	$(BIN)/python bench/bench_attacks.py

WORKDIR ?= $(or $(NASRISK_WORKDIR),nasrisk-runs)
PORT    ?= 5000
ui: $(STAMP)
	@test -f '$(abspath $(WORKDIR))/mlflow.db' || { echo "no MLflow store at $(abspath $(WORKDIR))/mlflow.db: run \`make demo\` first (or WORKDIR=...)"; exit 2; }
	$(BIN)/mlflow ui --backend-store-uri 'sqlite:///$(abspath $(WORKDIR))/mlflow.db' --host 127.0.0.1 --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf nasrisk-runs .pytest_cache
