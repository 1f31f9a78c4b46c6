# make demo | make test | make test-slow | make rehearsal | make dataset | make bench — each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test test-slow rehearsal dataset bench clean

$(STAMP): requirements-dev.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vessel-kit demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

rehearsal: $(STAMP)
	$(BIN)/python -m pytest -q -m 'slow or not slow' tests/test_kaggle_rehearsal.py

dataset: $(STAMP)
	./build_dataset.sh $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metric.py
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_infer.py
	$(BIN)/python benchmarks/bench_memory_format.py

clean:
	rm -rf $(VENV) demo_out build dist *.egg-info
