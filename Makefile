# Two entry points for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch and torchvision are pinned as a pair: a torchvision wheel only works against the torch it was
# built for ("operator torchvision::nms does not exist" otherwise), and timm needs torchvision.
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-fast test-lowest lint bench mutate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m retclip_dist.demo --output_dir demo

# Two workers, the longest tests first (tests/conftest.py; the Slurm tests take turns on the one node).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --no-loadscope-reorder --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not dist"

# The fast suite again on the lowest versions pyproject.toml declares, installed beside .venv in .lowest/.
test-lowest: $(STAMP)
	$(BIN)/python .ci/lowest.py .lowest
	PYTHONPATH=.lowest $(BIN)/python -m pytest -m "not slow and not dist" -p no:cacheprovider

# Not in CI: plants ~70 realistic bugs one at a time in a temporary copy and reports each as caught,
# survived, stale, timed out or crashed (tools/mutate.py; survivors are explained in TESTING.md). Up to an
# hour on 2 busy cores; MUTATE_ARGS=--slow adds the mutants that need slow tests (with --timeout 900 on a
# loaded machine), --only NAME picks some.
mutate: $(STAMP)
	$(BIN)/python tools/mutate.py $(MUTATE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf demo runs .pytest_cache .ruff_cache .lowest
