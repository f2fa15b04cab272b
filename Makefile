# The two quick-start commands: `make dev` runs a development vault, `make
# test` runs the whole test suite. Both install what a fresh machine lacks.

# One build directory for every run (RocksDB's C++ is most of a clean build).
CARGO_TARGET_DIR ?= $(HOME)/.cache/tokenvault-target
export CARGO_TARGET_DIR

# The test clients (grpcurl, kubernetes-validate) live in a virtual
# environment, since a distribution Python refuses a root `pip install`.
# Not TOKENVAULT_*: the server reads every TOKENVAULT_* variable as a
# config key and refuses unknown ones.
TV_TOOLS_VENV ?= $(HOME)/.cache/tokenvault-venv
export TV_TOOLS_VENV
export PATH := $(TV_TOOLS_VENV)/bin:$(PATH)

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
