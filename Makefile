# The two commands: `make demo` and `make test`. Both create the environment with uv if
# it is missing (uv itself is installed with pip when absent).
SHELL := /bin/bash
UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env browser label-studio label-studio-if-required demo test lint bench bench-quick bench-full protos client settings clean

env: .venv/.assay-synced

# `uv sync` installs the package with every extra: the dev group (the default group) holds
# assay[all] (pyproject.toml). `pip install assay` alone is the light client.
# --compile-bytecode: the .pyc files are written once here (~35 s on 2 cores). Without them every
# process compiles what it imports, each time where PYTHONDONTWRITEBYTECODE is set (as on these
# machines): importing sentence-transformers took 17 s instead of 8, and the suite ran
# 644-736 s instead of 561 s (each server, CLI and Ray worker that loads a model paid it).
.venv/.assay-synced: pyproject.toml uv.lock Makefile
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --compile-bytecode
	@touch $@

demo: env
	$(UV) run --frozen assay demo --data $${ASSAY_DATA:-./data}

# The web page's end-to-end tests drive Debian's Chromium (never a downloaded browser);
# installed here when missing and apt-get can run (as root or with sudo), else they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian's chromium for the browser tests"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; } \
	  || echo "could not install chromium: the browser tests will be skipped"; }

# Label Studio for the labeling round trip (tests/test_label_studio.py): its own virtual
# environment (it pins Django and many web packages: kept out of uv.lock) and a migrated
# SQLite data folder the test copies (so that starting skips the migrations: ~50 s here), both under
# .cache/label-studio/ (ignored by git). `make test` sets it up when ASSAY_REQUIRE_LABEL_STUDIO=1
# (.ci/run sets it); elsewhere run `make label-studio` once, or the test skips.
LABEL_STUDIO_VERSION := 1.23.2
LABEL_STUDIO_HOME := .cache/label-studio
# offline and quiet: no version check against PyPI, no analytics, no Sentry reports
# (and its data folder set before its settings load, so that nothing is written under ~)
LABEL_STUDIO_ENV := LABEL_STUDIO_LATEST_VERSION_CHECK=false LABEL_STUDIO_COLLECT_ANALYTICS=false \
	SENTRY_DSN= FRONTEND_SENTRY_DSN= LABEL_STUDIO_BASE_DATA_DIR=$(abspath $(LABEL_STUDIO_HOME)/db)

label-studio: $(LABEL_STUDIO_HOME)/.ready-$(LABEL_STUDIO_VERSION)

$(LABEL_STUDIO_HOME)/.ready-$(LABEL_STUDIO_VERSION):
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	rm -rf $(LABEL_STUDIO_HOME)
	$(UV) venv --quiet --python python3 $(LABEL_STUDIO_HOME)/venv
	$(UV) pip install --quiet --compile-bytecode --python $(LABEL_STUDIO_HOME)/venv/bin/python "label-studio==$(LABEL_STUDIO_VERSION)"
	$(LABEL_STUDIO_ENV) $(LABEL_STUDIO_HOME)/venv/bin/label-studio version \
		--data-dir $(LABEL_STUDIO_HOME)/db >$(LABEL_STUDIO_HOME)/migrate.log 2>&1
	@touch $@

# With ASSAY_REQUIRE_LABEL_STUDIO=1 (.ci/run) the install (minutes: mostly downloads) runs in
# the background while the suite runs; tests/test_label_studio.py runs last and waits for it
# (the marker .ready-<version>, or label-studio.failed with the log beside it).
label-studio-if-required:
	@if [ "$${ASSAY_REQUIRE_LABEL_STUDIO:-}" = 1 ] && [ ! -f $(LABEL_STUDIO_HOME)/.ready-$(LABEL_STUDIO_VERSION) ]; then \
	  mkdir -p .cache && rm -f .cache/label-studio.failed && \
	  echo "installing Label Studio $(LABEL_STUDIO_VERSION) in the background (log: .cache/label-studio-install.log)" && \
	  { nice -n 10 $(MAKE) --no-print-directory label-studio || touch .cache/label-studio.failed; } \
	    </dev/null >.cache/label-studio-install.log 2>&1 & \
	fi

test: env browser label-studio-if-required
	$(UV) run --frozen python -m protos.generate --check
	$(UV) run --frozen python -m service.client.generate --check
	$(UV) run --frozen python -m indexing.settings --check README.md
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest -q --durations=15

lint: env
	$(UV) run --frozen ruff check .

BENCHES := store service mining_scan uncertainty density diversity selection embedding web soak_writes soak_writes_log soak

# bench: every benchmark (BENCHES with --quick, the soak, the reduced active-learning plan) in
# about 35 minutes on 2 cores -> bench/results/latest.md and latest.json (bench/run_all.py).
# bench-quick: the scripts only, --quick (~4 minutes). bench-full: default sizes and the full
# active-learning protocol (hours). Extra options: make bench BENCH_ARGS="--skip soak,soak_writes".
bench: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" $(BENCH_ARGS)

bench-quick: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" --skip al $(BENCH_ARGS)

bench-full: env
	$(UV) run --frozen python -m bench.run_all --benches "$(BENCHES)" --full $(BENCH_ARGS)

protos: env
	$(UV) run --frozen python -m protos.generate

# The asyncio client (service/client/async_client.py) is generated from the sync one
# (service/client/sync.py); `make test` fails when it is out of date.
client: env
	$(UV) run --frozen python -m service.client.generate

# The README's table of settings is generated from indexing/settings.py; `make test` fails
# when it is out of date.
settings: env
	$(UV) run --frozen python -m indexing.settings --write README.md

clean:
	rm -rf .venv .pytest_cache .ruff_cache
