#!/usr/bin/env bash
# Runs the whole tunnel on one machine with the built-in defaults and shows a round trip:
#
#   tcp client ──▶ tunnel-client :7000 ──HTTP──▶ tunnel-servlet :8080 ◀──link :8081── tunnel-broker (echo)
#
# Usage: bash scripts/demo.sh            (builds the release binaries first)
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building release binaries"
cargo build --release --bins -q
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# The link secret is the one thing without a default: a deployment must choose its own.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$work/link-secret"

export RUST_LOG=${RUST_LOG:-info}
"$bin/tunnel-servlet" --link-secret-file "$work/link-secret" > "$work/relay.log" 2>&1 &
pids+=($!)
wait_port() { # host port
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing listens on $1:$2; logs are below" >&2
    tail -n 20 "$work"/*.log >&2
    exit 1
}
wait_port 127.0.0.1 8080
"$bin/tunnel-broker" --link-secret-file "$work/link-secret" --echo > "$work/broker.log" 2>&1 &
pids+=($!)
"$bin/tunnel-client" > "$work/client.log" 2>&1 &
pids+=($!)
wait_port 127.0.0.1 7000

echo "== relay on http://127.0.0.1:8080/tunnel, broker 'echo' linked, client listening on 127.0.0.1:7000"
message="hello through the HTTP tunnel at $(date +%T)"
reply=""
for _ in $(seq 1 50); do
    # The broker links a moment after it starts; until then the relay answers 404.
    if exec 3<>/dev/tcp/127.0.0.1/7000; then
        printf '%s\n' "$message" >&3
        IFS= read -r -t 10 reply <&3 || true
        exec 3<&- 3>&-
    fi
    [ -n "$reply" ] && break
    sleep 0.2
done
echo "sent:     $message"
echo "received: $reply"
echo "== logs"
tail -n 5 "$work/relay.log" "$work/broker.log" "$work/client.log"
if [ "$reply" = "$message" ]; then
    echo "== round trip OK"
else
    echo "== round trip FAILED" >&2
    exit 1
fi
