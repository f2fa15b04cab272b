#!/bin/sh
# Runs every cargo-fuzz target for a bounded time: scripts/fuzz.sh [SECONDS]
# (default 60 per target). Needs a nightly toolchain and cargo-fuzz (installed
# here if missing). New inputs the fuzzer finds land in fuzz/corpus/<target>/
# (ignored by git; check in the ones worth keeping); a crash is written to
# fuzz/artifacts/<target>/ and fails the script.
#
# Without nightly, `make test` still replays fuzz/corpus through the same
# target bodies (tests/fuzz_corpus.rs).
set -eu
seconds=${1:-60}
cd "$(dirname "$0")/.."

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: no nightly toolchain (rustup toolchain install nightly); the corpus replays in make test" >&2
    exit 2
fi
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
target_dir=${CARGO_FUZZ_TARGET_DIR:-$HOME/.cache/tokenvault-fuzz-target}
triple_dir="$target_dir/$(rustc +nightly -vV | sed -n 's/^host: //p')/release"
# The request target makes a vault in a temporary directory per process.
TMPDIR=$(mktemp -d)
export TMPDIR
trap 'rm -rf "$TMPDIR"' EXIT

for target in token identity config request; do
    echo "fuzz.sh: $target for ${seconds}s" >&2
    # -s none: the code under test is safe Rust (and C++ we do not
    # instrument), so AddressSanitizer adds cost without coverage.
    cargo +nightly fuzz run -s none --target-dir "$target_dir" "$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=4096 -print_final_stats=1
    # Each build of a changed crate links a new ~500 MB binary beside the old
    # ones; keep only the one Cargo just linked (hard-linked to its target
    # name) so the shared build dir does not fill the disk.
    for binary in "$triple_dir/deps/$target"-*; do
        if [ -x "$binary" ] && ! [ "$binary" -ef "$triple_dir/$target" ]; then
            rm -f "$binary"
        fi
    done
done
