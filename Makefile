# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-quick test-fast lint bench leaderboard notebooks clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,verifiers,gymnax]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/kvjax demo

# One pytest worker per core (pytest-xdist); idle workers take tests from busy ones' queues.
XDIST := -n auto --dist worksteal

test: $(STAMP)
	$(BIN)/python -m pytest tests $(XDIST) --durations=30

# The quick loop while developing (tests/harness/test_smoke.py): every module imports; every env makes,
# steps, rolls out and trains one PPO update on tiny configs.
test-quick: $(STAMP)
	$(BIN)/python -m pytest tests -m quick $(XDIST)

# Everything but notebooks, training runs and multi-device subprocesses.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests -m "not slow" $(XDIST)

# Files kept in `ruff format` style (the rest of the tree predates it; add files as they are
# formatted - never reformat kvjax/serve/ from here).
FORMATTED := kvjax/validation.py kvjax/cache/gymnax_env.py kvjax/cache/gymnax_hook.py tests/conftest.py \
	tests/harness/test_validation.py tests/harness/test_readme.py tests/cache/test_gymnax_env.py \
	scripts/adversarial_probe.py kvjax/serve tests/serve scripts/derive_serve_data.py \
	kvjax/base.py kvjax/cache/layout.py tests/cache/test_layout.py tests/harness/test_bench.py \
	kvjax/registry.py kvjax/stats.py kvjax/xla.py tests/trees.py tests/harness/conftest.py \
	tests/harness/test_registry.py tests/harness/test_stats.py tests/harness/test_smoke.py \
	tests/harness/test_xla.py

lint: $(STAMP)
	$(BIN)/ruff check kvjax train tests kv_cache_eviction
	$(BIN)/ruff format --check $(FORMATTED)

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
