#!/usr/bin/env bash
# Three Wharf hosts as one cluster on a local NATS JetStream, behind HAProxy:
#
#   examples/cluster/run.sh [path/to/wharf]
#
# Needs nats-server and haproxy (Debian: apt-get install nats-server haproxy)
# and a built wharf (cargo build --release). Each host has its own services
# directory under $WORK (default: a temporary directory): drop a component
# into any of them, and all three serve it — or deploy to any host with
# `wharf deploy FILE.wasm --to http://127.0.0.1:9191 --token-file
# $WORK/admin-token`. Requests go to http://127.0.0.1:8180 (HAProxy; the
# demo keeps 8080); each host's admin endpoint, with GET /cluster, is on
# 127.0.0.1:919N, behind the token in $WORK/admin-token (made here, random).
# Ctrl-C stops everything.
#
# Messages on Kafka while NATS keeps the cluster's index: set KAFKA to the
# brokers (KAFKA=kafka://127.0.0.1:9092 examples/cluster/run.sh); every host
# then passes --broker "$KAFKA", and its trigger groups are Kafka consumer
# groups shared by the three hosts.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
wharf="${1:-$here/../../target/release/wharf}"
work="${WORK:-$(mktemp -d)}"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

# The admin token every host checks: random, readable by this user only.
umask 077
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/admin-token"
umask 022

mkdir -p "$work/nats"
nats-server -js -a 127.0.0.1 -p 4322 -sd "$work/nats" >"$work/nats.log" 2>&1 &
pids+=($!)
sleep 0.5

broker=()
if [[ -n "${KAFKA:-}" ]]; then broker=(--broker "$KAFKA"); fi

for n in 1 2 3; do
    mkdir -p "$work/h$n/services" "$work/h$n/data"
    "$wharf" serve "$work/h$n/services" \
        --listen "127.0.0.1:818$n" --admin "127.0.0.1:919$n" \
        --admin-token-file "$work/admin-token" \
        --data-dir "$work/h$n/data" \
        --cluster nats://127.0.0.1:4322 --cluster-host-id "h$n" \
        "${broker[@]}" \
        >"$work/h$n.log" 2>&1 &
    pids+=($!)
done

haproxy -f "$here/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)

echo "cluster up: http://127.0.0.1:8180 (HAProxy), admin on 127.0.0.1:9191-9193 (token: $work/admin-token), files in $work"
echo "try: wharf deploy guests/target/wasm32-wasip2/release/hello.wasm --to http://127.0.0.1:9191 --token-file $work/admin-token && curl http://127.0.0.1:8180/hello"
wait
