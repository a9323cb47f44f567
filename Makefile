# pixelray developer entry points. The README's quickstart is `make demo` and `make test`;
# each one creates .venv first when it is missing (or when pyproject.toml / pins changed).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.pixelray-installed
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-pins.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements-pins.txt -r requirements-pins.txt
	$(BIN)/python -m pip install -q -c requirements-pins.txt -e ".[all]"
	touch $(STAMP)

# The main job on the example images shipped in the repo, offline: the bundled shapes-demo model
# (pixelray/models/shapes-demo) captions them, and the captions are scored against the references.
demo: $(STAMP)
	$(BIN)/pixelray caption examples/shapes --out runs/demo --overwrite
	$(BIN)/pixelray eval runs/demo --references examples/shapes/captions.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/caption.py
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf runs .pytest_cache
