# Two commands on a fresh machine with Python 3.11:
#   make demo   - install into .venv, then run the whole pipeline on built-in phantom CT data
#   make test   - install into .venv (with test extras), then run the test suite
# TORCH_SPEC picks the PyTorch build pip installs first (a CUDA machine may use plain `torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: install demo test test-fast lint clean

$(BIN)/.medhpm-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.medhpm-installed

demo: install
	$(BIN)/medhpm demo $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q

test-fast: install  # the inner loop (2.8 min on 2 cores): skips the slow tests (tests/durations.json, marked by hand)
	$(BIN)/python -m pytest -q -m "not slow"

lint: install  # pyflakes and pycodestyle's errors, the formatting, the types of src ([tool.ruff], [tool.mypy])
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m mypy

clean:
	rm -rf $(VENV) runs
