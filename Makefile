# The two commands: `make demo` and `make test`. Both create the environment with uv if
# it is missing (uv itself is installed with pip when absent).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test lint bench bench-quick bench-full protos clean

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

BENCHES := store service mining_scan uncertainty density diversity embedding soak

# bench: every benchmark (BENCHES with --quick, the soak, the reduced active-learning plan) in
# about 20 minutes on 2 cores -> bench/results/latest.md and latest.json (bench/run_all.py).
# bench-quick: the scripts only, --quick (~4 minutes). bench-full: default sizes and the full
# active-learning protocol (hours). Extra options: make bench BENCH_ARGS="--skip soak".
bench: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" $(BENCH_ARGS)

bench-quick: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" --skip al $(BENCH_ARGS)

bench-full: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" --full $(BENCH_ARGS)

protos: env
	$(UV) run --frozen python -m protos.generate

clean:
	rm -rf .venv .pytest_cache .ruff_cache
