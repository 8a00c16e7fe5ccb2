# The two commands: `make demo` and `make test`. Both create the environment with uv if
# it is missing (uv itself is installed with pip when absent).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test lint bench bench-quick protos clean

env: .venv/.assay-synced

.venv/.assay-synced: pyproject.toml uv.lock
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen
	@touch $@

demo: env
	$(UV) run --frozen assay demo --data $${ASSAY_DATA:-./data}

test: env
	$(UV) run --frozen python -m protos.generate --check
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest -q

lint: env
	$(UV) run --frozen ruff check .

BENCHES := store service mining_scan uncertainty density diversity soak

# Every benchmark at its default size (~25 minutes on 2 cores); bench-quick: ~3 minutes.
bench: env
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(UV) run --frozen python bench/$$b.py || exit 1; done

bench-quick: env
	@for b in $(BENCHES); do echo "== bench/$$b.py --quick"; $(UV) run --frozen python bench/$$b.py --quick || exit 1; done

protos: env
	$(UV) run --frozen python -m protos.generate

clean:
	rm -rf .venv .pytest_cache .ruff_cache
