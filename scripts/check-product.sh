#!/usr/bin/env bash
# The product binary, built as a user builds it (no `testkit` feature),
# holds no test scaffolding: no benchmark, no throwaway PostgreSQL cluster
# or SoftHSM token, and no `bench` command. The tests build the crate with
# the scaffolding (a dev-dependency on itself turns `testkit` on), so this
# builds the binary without it and reads its symbols and its help. (Built
# with `--features testkit`, the same binary fails both checks.) The linker
# keeps only what the binary can reach, so a symbol here means scaffolding
# a command can run.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"

cargo build --quiet --bin tokenvault
bin="$target/debug/tokenvault"
[[ -x "$bin" ]] || { echo "check-product: no binary at $bin" >&2; exit 1; }

symbols=$(nm --demangle "$bin")
help=$("$bin" --help)
# Both legacy and v0 mangling demangle to paths; v0 adds `[hash]` after
# the crate's name.
crate='tokenvault(\[[0-9a-f]+\])?'
# A positive control: the reading works (the server is in every build).
if ! grep -qE "${crate}::server::run" <<<"$symbols"; then
    echo "check-product: cannot read the binary's symbols (no ${crate}::server::run)" >&2
    exit 1
fi
scaffolding="${crate}::(fuzzing|bench|crypto::softhsm|store::postgres::cluster)::|ThrowawayCluster|ThrowawayHsm"
found=$(grep -E "$scaffolding" <<<"$symbols" | sed 's/^[0-9a-f]* [a-zA-Z] //' | sort -u | head -5 || true)
if [[ -n "$found" ]]; then
    echo "check-product: the product binary holds test scaffolding:" >&2
    echo "$found" >&2
    exit 1
fi
if grep -qE '^  bench ' <<<"$help"; then
    echo "check-product: the product binary has a bench command" >&2
    exit 1
fi
echo "check-product: $bin holds no test scaffolding"
