# Two entry points: `make smoke` (the main job on its tiny CPU default) and `make test`.
# Each creates .venv with the pinned dependencies when it is missing or out of date.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: smoke test bench clean

$(INSTALLED): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

smoke: $(INSTALLED)
	$(BIN)/olmoe-gatepro smoke

test: $(INSTALLED)
	$(BIN)/python -m pytest

bench: $(INSTALLED)
	$(BIN)/python benchmarks/router_overhead.py --quick

clean:
	rm -rf $(VENV) runs
