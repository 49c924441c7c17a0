# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench leaderboard notebooks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,verifiers,gymnax]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvjax demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

# The quick loop: everything but notebooks, training runs and multi-device subprocesses.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check kvjax train tests kv_cache_eviction

bench: $(STAMP)
	$(BIN)/kvjax bench

leaderboard: $(STAMP)
	$(BIN)/kvjax leaderboard

# Execute every analysis notebook and render HTML into build/notebooks/ (NB_SMALL=1: CI sizes).
notebooks: $(STAMP)
	mkdir -p build/notebooks
	KVJAX_NB_SMALL=$(NB_SMALL) $(BIN)/jupyter nbconvert --to html --execute \
		--ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.timeout=-1 \
		--output-dir build/notebooks notebooks/*.ipynb

clean:
	rm -rf $(VENV) build .pytest_cache
