# callboard — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PYTHON      := $(VENV)/bin/python
VENV_STAMP  := $(VENV)/.installed
STANDIN     ?= $(abspath ../shared/standin/nx_standin.py)
RUN_DIR     := .run
SUDO        := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
CARGO       ?= cargo

# `make run` ports and settings (override on the command line).
RUN_MONGO_PORT ?= 27018
RUN_REDIS_PORT ?= 16379
RUN_HTTP_ADDR  ?= 127.0.0.1:8006
RUN_CALLS      ?= 10000
RUN_TENANTS    ?= 10
RUN_SECRET     ?= callboard-demo-secret-not-for-production
export RUN_MONGO_PORT RUN_REDIS_PORT RUN_HTTP_ADDR RUN_CALLS RUN_TENANTS RUN_SECRET STANDIN

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install what tests and `make run` need (redis-server, Chromium and chromedriver, the stand-in venv)
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }
	@command -v redis-server >/dev/null || { echo "redis-server could not be installed" >&2; exit 1; }
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null; }
	@command -v chromedriver >/dev/null || { echo "chromium and chromedriver could not be installed (the board page's test needs them)" >&2; exit 1; }
	@$(MAKE) --no-print-directory $(VENV_STAMP)
	@$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	@$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	@test -f $(STANDIN) || { echo "missing $(STANDIN): ../shared must sit beside the checkout" >&2; exit 1; }

$(VENV_STAMP): deploy/standin/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r deploy/standin/requirements.txt
	@touch $(VENV_STAMP)

# The integration tests run twice: on one Redis, then on a three-master
# Redis Cluster with the tenants over three projector partitions. The
# second pass builds the whole workspace too and filters the tests: built
# with `-p` only, features unify differently and half the dependency
# graph was compiled again (4.5 min from a clean clone).
# (the replay properties with 64 cases each there, 256 on one node; the
# verifier's busy workload 200 writes there, 400 on one node).
CLUSTER_ENV := CALLBOARD_TEST_REDIS_TOPOLOGY=cluster CALLBOARD_TEST_PARTITIONS=3 CALLBOARD_TEST_REPLAY_CASES=64 \
	CALLBOARD_TEST_RECONCILE_ROUNDS=200

.PHONY: test
test: deps ## Run the whole suite against real Redis and the MongoDB stand-in, then the integration tests on a Redis Cluster
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast && \
		echo "== again on a Redis Cluster (3 masters), 3 projector partitions ==" && \
		$(CLUSTER_ENV) $(CARGO) nextest run --workspace --no-fail-fast -E 'package(callboard-tests) | package(callboard)'; \
	else \
		$(CARGO) test --workspace --no-fail-fast && \
		$(CLUSTER_ENV) $(CARGO) test -p callboard-tests -p callboard --no-fail-fast; \
	fi

.PHONY: fuzz
fuzz: ## Property-based fuzzing of every parser, 1.15M cases (`make test` runs 500 per target)
	@set -e; started=$$(date +%s); \
	CALLBOARD_FUZZ_CASES=200000 $(CARGO) nextest run -p callboard-api -E 'test(params::fuzz)'; \
	CALLBOARD_FUZZ_CASES=100000 $(CARGO) nextest run -p callboard-api -E 'test(auth::fuzz) | test(admin::fuzz)'; \
	CALLBOARD_FUZZ_CASES=50000 $(CARGO) nextest run -p callboard-projector -E 'test(transform::fuzz)'; \
	echo "fuzzed 1,150,000 cases (3 x 200k parameter encodings, 5 x 100k tokens and admin bodies, 50k change-event batches) in $$(( $$(date +%s) - started )) s"

.PHONY: fmt
fmt: ## Format the code
	$(CARGO) fmt --all

.PHONY: lint
lint: deps ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The binary is always built alone (`-p callboard`): built together with
# the bench, features unify differently and `make run` after `make bench`
# (or the reverse) recompiled half the dependency graph.
.PHONY: build
build: ## Build the release binary
	$(CARGO) build --release -p callboard

.PHONY: bench
bench: deps ## criterion micro-benchmarks, then loads at 10K, 100K and 1M calls (long); writes BENCHMARKS.md
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(CARGO) build --release -p callboard && $(CARGO) build --release -p callboard-bench
	$(CARGO) bench -p callboard-bench
	target/release/callboard-bench --out BENCHMARKS.md
	target/release/callboard-bench --scale --out BENCHMARKS.md
	target/release/callboard-bench --stream --out BENCHMARKS.md

.PHONY: bench-scale
bench-scale: deps ## Scale-out figures: hits on a 3-master cluster, projection rate with 1/2/4 projectors, memory per master (long)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(CARGO) build --release -p callboard && $(CARGO) build --release -p callboard-bench
	target/release/callboard-bench --scale --out BENCHMARKS.md

.PHONY: bench-stream
bench-stream: deps ## The board stream's figures: write-to-event latency at 1 and 1,000 connections, idle memory and CPU (about 1 min)
	$(CARGO) build --release -p callboard && $(CARGO) build --release -p callboard-bench
	target/release/callboard-bench --stream --out BENCHMARKS.md

.PHONY: bench-pipeline
bench-pipeline: ## The projector's own throughput without MongoDB, and where each kind's time goes and what each key type costs after its warm, printed (make bench reports it too; under a minute)
	$(CARGO) build --release -p callboard && $(CARGO) build --release -p callboard-bench
	target/release/callboard-bench --pipeline

.PHONY: bench-quick
bench-quick: deps ## The 10K-call benchmarks only (under a minute once built)
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(CARGO) build --release -p callboard && $(CARGO) build --release -p callboard-bench
	target/release/callboard-bench --quick --out BENCHMARKS.md

.PHONY: run
run: deps build ## Start Redis and the stand-in, seed demo data, serve on :8006
	@bash deploy/run-local.sh

.PHONY: run-cluster
run-cluster: deps build ## The same on a local 3-master Redis Cluster (ports 16379-16381), 4 projector partitions
	@RUN_CLUSTER=1 bash deploy/run-local.sh
