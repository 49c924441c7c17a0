# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench leaderboard notebooks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,verifiers]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvjax demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check kvjax train tests kv_cache_eviction

bench: $(STAMP)
	$(BIN)/kvjax bench

leaderboard: $(STAMP)
	$(BIN)/kvjax leaderboard

clean:
	rm -rf $(VENV) build .pytest_cache
