# Two commands that work on a fresh machine:
#   make test   set up .venv and run the test suite
#   make demo   set up .venv and run the end-to-end demo on data shipped with the dependencies
#   make conformance   only transformers' own common model tests against every medfm model class
#               (tests/conformance; `make test` runs them too). The first run downloads the installed
#               transformers release's sdist from PyPI into ~/.cache/medfm (see tests/conformance/).
# GPU users: `make test TORCH=torch` (or any torch requirement) installs the CUDA build instead of the
# pinned CPU wheel used on our CI machines. `make test EXTRAS=dev,demo,app,triton` adds Triton, whose kernel
# tests then run (under the Triton interpreter on CPU).
# The `app` extra (Gradio) is in the default EXTRAS so the web viewer's tests run; its real-browser test also
# needs Chromium (`apt-get install chromium`, which .ci/run does) and skips, saying so, where there is none.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?= -n 2
EXTRAS ?= dev,demo,app
BIN := $(VENV)/bin
STAMP := $(VENV)/.medfm-installed

.PHONY: test conformance demo setup lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the package metadata changes. torch goes first so that the package's
# unpinned `torch` requirement is already satisfied and no multi-GB CUDA build is pulled.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

conformance: $(STAMP)
	$(BIN)/python -m pytest tests/conformance $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/medfm demo --out demo_outputs

lint: $(STAMP)
	$(BIN)/ruff check src tests conversion examples benchmarks
	$(BIN)/ruff format --check src tests conversion examples benchmarks

clean:
	rm -rf $(VENV) demo_outputs build dist src/*.egg-info
