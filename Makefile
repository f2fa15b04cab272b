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
# The dependency audit's cargo tools (cargo-deny, cargo-cyclonedx).
TV_CARGO_TOOLS ?= $(HOME)/.cache/tokenvault-cargo-tools
export TV_CARGO_TOOLS
export PATH := $(TV_TOOLS_VENV)/bin:$(TV_CARGO_TOOLS)/bin:$(PATH)

.PHONY: dev test lint deps test-deps deny sbom advisories audit-deps

dev: deps
	cargo run --bin tokenvault -- serve --dev

test: test-deps
	cargo test --all-targets
	cargo test --doc
	scripts/check-product.sh

lint: deps
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --bin tokenvault -- -D warnings

# The dependency graph against deny.toml, offline: licences, sources
# (crates.io only), banned crates and one version of each TLS and key
# crate.
deny: audit-deps
	cargo fetch --locked
	cargo deny --offline check --hide-inclusion-graph licenses bans sources

# The CycloneDX SBOM of the binary, RocksDB's C++ and the other native
# libraries included, checked against cargo's graph.
sbom: audit-deps
	scripts/sbom.py $(CARGO_TARGET_DIR)/sbom

# Known vulnerabilities (RustSec): needs the network to fetch the database.
advisories: audit-deps
	cargo deny check advisories

audit-deps:
	@scripts/install-deps.sh --audit

deps:
	@scripts/install-deps.sh

test-deps:
	@scripts/install-deps.sh --test
