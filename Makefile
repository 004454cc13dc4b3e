# WiCore: `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8000
DEMO   := models/gemma-3-demo.gguf
DEMO_MMPROJ := models/mmproj-gemma-3-demo-f16.gguf
BENCH_MODEL := models/bench-gemma3-262k-q8_0.gguf
LLAMA_PIN := llama-cpp-python==0.3.36

.PHONY: serve test test-big bench bench-ray install install-test install-bench install-ray \
	install-cuda demo-model clean systemd-tools

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# llama-cpp-python compiles llama.cpp from source (about 5 minutes on 2 cores); pip caches
# the wheel, so later installs on the same machine are quick.
$(VENV)/.installed: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

# The tests include the Ray workers, so the test set-up installs the `ray` extra too.
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test,ray]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -e '.[bench]'
	touch $@

$(VENV)/.installed-ray: $(VENV)/.installed
	$(BIN)/pip install -e '.[ray]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench
install-ray: $(VENV)/.installed-ray

# The demo model and its vision projector (found beside it by name), made together.
$(DEMO) $(DEMO_MMPROJ) &: tools/make_model.py | $(VENV)/.installed
	$(BIN)/python tools/make_model.py --preset demo --out $(DEMO) --mmproj $(DEMO_MMPROJ)

demo-model: $(DEMO) $(DEMO_MMPROJ)

serve: $(VENV)/.installed $(DEMO) $(DEMO_MMPROJ)
	$(BIN)/wicore serve --host $(HOST) --port $(PORT)

# The suite, then the one test that serves Gemma-3-27B's real size (about 20 GiB of RAM for a
# few minutes), alone: tests/test_big_model.py.
test: $(VENV)/.installed-test $(DEMO) $(DEMO_MMPROJ) systemd-tools
	$(BIN)/python -m pytest
	$(MAKE) test-big

test-big: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m big tests/test_big_model.py

# tests/test_deploy.py checks deploy/wicore-engine.service with systemd-analyze. Install it
# where we may (root with apt-get); elsewhere that test is skipped and says why.
systemd-tools:
	@command -v systemd-analyze >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && apt-get update -qq && apt-get install -y -qq --no-install-recommends systemd \
	          >/dev/null; } \
	  || echo "systemd-analyze is not installed and cannot be installed here:" \
	          "tests/test_deploy.py will skip its unit-file check"

$(BENCH_MODEL): tools/make_model.py | $(VENV)/.installed
	$(BIN)/python tools/make_model.py --preset bench-262k --out $@

# Raw llama.cpp's ceiling (llama-bench, llama-batched-bench), then single-turn streams against
# llama.cpp's own llama-server and llama-cpp-python's server, then multi-turn chats against
# llama-server (all built once from the pinned sdist's vendor/llama.cpp into build/llama-server).
bench: $(VENV)/.installed-bench $(BENCH_MODEL)
	$(BIN)/python tools/bench.py compare --model $(BENCH_MODEL)
	$(BIN)/python tools/bench.py multiturn --model $(BENCH_MODEL)

# One local worker process against one Ray actor worker (a local Ray instance), 16 streams.
bench-ray: $(VENV)/.installed-bench $(VENV)/.installed-ray $(BENCH_MODEL)
	$(BIN)/python tools/bench.py compare --model $(BENCH_MODEL) --servers wicore,wicore-ray \
	    --skip-priority

# Rebuild llama.cpp with CUDA so `n_gpu_layers` offloads (needs nvcc on PATH).
install-cuda: $(VENV)/.installed
	CMAKE_ARGS="-DGGML_CUDA=on" $(BIN)/pip install --force-reinstall --no-cache-dir --no-deps $(LLAMA_PIN)

clean:
	rm -rf $(VENV) $(DEMO) $(DEMO_MMPROJ) $(BENCH_MODEL)
