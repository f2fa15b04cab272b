# The two quick-start commands: `make dev` runs a development vault, `make
# test` runs the whole test suite. Both install what a fresh machine lacks.

# One build directory for every run (RocksDB's C++ is most of a clean build).
CARGO_TARGET_DIR ?= $(HOME)/.cache/tokenvault-target
export CARGO_TARGET_DIR

# The test clients (grpcurl, kubernetes-validate) live in a virtual
# environment, since a distribution Python refuses a root `pip install`.
TOKENVAULT_VENV ?= $(HOME)/.cache/tokenvault-venv
export TOKENVAULT_VENV
export PATH := $(TOKENVAULT_VENV)/bin:$(PATH)

.PHONY: dev test lint deps test-deps

dev: deps
	cargo run --bin tokenvault -- serve --dev

test: test-deps
	cargo test --all-targets
	cargo test --doc

lint: deps
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

deps:
	@scripts/install-deps.sh

test-deps:
	@scripts/install-deps.sh --test
