# The two commands of the README: `make demo` (install + the whole pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint bench clean

install: $(STAMP)

# torch is installed first and then held by constraints.txt, so that no dependency pulls a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
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
