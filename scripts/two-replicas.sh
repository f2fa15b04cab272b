#!/usr/bin/env bash
# Two vault replicas on one local PostgreSQL: the PostgreSQL engine, tried on
# one machine. Starts two throwaway PostgreSQL clusters (in a temporary
# directory, unix sockets only), one for the vault's database and one for
# the erasure ledger's (a cluster of its own, as in production: a restore
# of the vault's cluster must not roll the ledger back with it; see
# deploy/README.md), then two `tokenvault serve` processes on them with the
# dev vault's certificates and master key (tokenvault-dev/, made here if
# `make dev` has not made it yet), on localhost:50061 and localhost:50062.
# A token minted through one reads through the other. Ctrl-C stops all
# three and deletes the cluster.
#
#   scripts/two-replicas.sh
#
# Environment (for tests/postgres.rs, which runs this script):
#   TV_BIN        a tokenvault binary to use instead of building one
#   TV_DEV_DIR    the dev directory (default tokenvault-dev)
#   TV_PORT_BASE  replica n serves gRPC on base+n, health on base+10+n and
#                 metrics on base+20+n (default 50060: 50061, 50071, 50081)
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --probe postgres >/dev/null 2>&1 || scripts/install-deps.sh --test
if [ -n "${TV_BIN:-}" ]; then
    tokenvault=$TV_BIN
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tokenvault-target}"
    cargo build --bin tokenvault
    tokenvault="$CARGO_TARGET_DIR/debug/tokenvault"
fi
dev=${TV_DEV_DIR:-tokenvault-dev}
base=${TV_PORT_BASE:-50060}

# The dev directory (certificates, master key, policy), without serving.
if [ ! -f "$dev/tokenvault.toml" ]; then
    "$tokenvault" serve --dev --dev-dir "$dev" --prepare-only >/dev/null
fi

pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
cluster=$(mktemp -d "${TMPDIR:-/tmp}/tokenvault-replicas.XXXXXX")
as_owner=()
if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root: its own user owns the cluster.
    chown postgres "$cluster"
    as_owner=(runuser -u postgres --)
fi
pids=()
stop() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    for data in vault ledger; do
        "${as_owner[@]}" "$pgbin/pg_ctl" -s -D "$cluster/$data" -m fast stop || true
    done
    rm -rf "$cluster"
}
trap stop EXIT
trap 'exit 130' INT TERM

# The vault's cluster on socket port 5432, the ledger's on 5433 (both
# sockets in the temporary directory: no TCP port is taken).
port=5432
for data in vault ledger; do
    "${as_owner[@]}" "$pgbin/initdb" -D "$cluster/$data" -U tokenvault --auth=trust -E UTF8 >/dev/null
    "${as_owner[@]}" "$pgbin/pg_ctl" -s -D "$cluster/$data" -l "$cluster/$data.log" -w \
        -o "-k $cluster -p $port -c listen_addresses=''" start
    "${as_owner[@]}" "$pgbin/psql" -q -h "$cluster" -p "$port" -U tokenvault -d postgres \
        -c "CREATE DATABASE tokenvault_$data"
    port=$((port + 1))
done

# One config per replica: the dev vault's files and policy, the two
# databases, its own ports.
policy=$(sed -n '/^\[\[policy\]\]/,$p' "$dev/tokenvault.toml")
for n in 1 2; do
    cat >"$dev/replica-$n.toml" <<TOML
# Written by scripts/two-replicas.sh: replica $n of the dev vault on PostgreSQL.
[server]
listen = "127.0.0.1:$((base + n))"
health_listen = "127.0.0.1:$((base + 10 + n))"
metrics_listen = "127.0.0.1:$((base + 20 + n))"
[tls]
cert = "tls/server.pem"
key = "tls/server.key"
client_ca = "tls/ca.pem"
[keys]
master_key_file = "master.key"
[storage]
engine = "postgres"
[storage.postgres]
connection = "host=$cluster port=5432 user=tokenvault dbname=tokenvault_vault"
[subjects.erasure_ledger_database]
connection = "host=$cluster port=5433 user=tokenvault dbname=tokenvault_ledger"
$policy
TOML
    "$tokenvault" serve --config "$dev/replica-$n.toml" 2>"$dev/replica-$n.log" &
    pids+=($!)
done
for n in 1 2; do
    for _ in $(seq 300); do
        grep -q 'serving' "$dev/replica-$n.log" 2>/dev/null && break
        kill -0 "${pids[$((n - 1))]}" 2>/dev/null || {
            echo "replica $n did not start:" >&2
            cat "$dev/replica-$n.log" >&2
            exit 1
        }
        sleep 0.1
    done
done

cat <<TEXT
two replicas of the dev vault on PostgreSQL (vault and ledger clusters in $cluster):
  replica 1: localhost:$((base + 1)) (health $((base + 11)))   log: $dev/replica-1.log
  replica 2: localhost:$((base + 2)) (health $((base + 12)))   log: $dev/replica-2.log
try:
  $tokenvault client --dev-dir $dev --as checkout --addr localhost:$((base + 1)) tokenize email ada@example.com
  $tokenvault client --dev-dir $dev --addr localhost:$((base + 2)) detokenize --purpose customer_support TOKEN
Ctrl-C stops them.
TEXT
wait "${pids[@]}"
