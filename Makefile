# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - set up, then run the demo on the built-in data with the embedded Prefect
#   make test   - set up, then run the whole test suite (what CI runs)
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# One torch thread: two threads on a loaded 2-core machine make training 5-8x slower.
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 \
	TRL_EXPERIMENTAL_SILENCE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
DEMO_ENV := HF_HUB_OFFLINE=1 TRL_EXPERIMENTAL_SILENCE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is capped below 2.14 in pyproject.toml, so pip takes the local CPU wheel.
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: setup
	$(DEMO_ENV) $(BIN)/alignflow pipeline

test: setup
	$(TEST_ENV) $(BIN)/pytest -q

test-fast: setup
	$(TEST_ENV) $(BIN)/pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/pretrain.py

clean:
	rm -rf $(VENV) .pytest_cache
