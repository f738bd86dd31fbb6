#!/usr/bin/env bash
# Checks the systemd units in deploy/systemd/ against the real binaries:
#   bash scripts/verify-systemd.sh [BIN_DIR]      (default: ${CARGO_TARGET_DIR:-target}/debug)
#
# `systemd-analyze verify` needs each ExecStart binary to exist, so the units are copied to a
# temporary directory with /usr/local/bin/ replaced by BIN_DIR (the freshly built binaries;
# nothing is installed). It exits 0 even for unknown keys or unparsable values (it only
# warns), so any output at all is treated as a failure. Then the hardening the units promise
# is checked to be there, and `systemd-analyze security --offline` must rate each unit's
# exposure at most MAX_EXPOSURE (on its 0-100 scale; both units rate 15 today).
set -euo pipefail

cd "$(dirname "$0")/.."
BIN_DIR="${1:-${CARGO_TARGET_DIR:-target}/debug}"
BIN_DIR="$(cd "$BIN_DIR" && pwd)"
MAX_EXPOSURE=20
# The units to check (another directory only to test this script).
UNIT_DIR="${UNIT_DIR:-deploy/systemd}"
REQUIRED=(
    "DynamicUser=yes"
    "ProtectSystem=strict"
    "NoNewPrivileges=yes"
    "CapabilityBoundingSet="
    "PrivateTmp=yes"
    "ProtectHome=yes"
    "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX"
    "LoadCredential=link-secret:/etc/tunnel/link-secret"
)

command -v systemd-analyze >/dev/null || {
    echo "systemd-analyze not found: install the Debian package systemd" >&2
    exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
status=0
for unit in "$UNIT_DIR"/*.service; do
    name="$(basename "$unit")"
    binary="${name%.service}"
    fail=0
    if [ ! -x "$BIN_DIR/$binary" ]; then
        echo "FAIL $name: $BIN_DIR/$binary missing (run cargo build --workspace --bins)" >&2
        status=1
        continue
    fi
    grep -q "^ExecStart=/usr/local/bin/$binary " "$unit" || {
        echo "FAIL $name: ExecStart does not start /usr/local/bin/$binary" >&2
        fail=1
    }
    sed "s|/usr/local/bin/|$BIN_DIR/|g" "$unit" >"$work/$name"
    if out="$(systemd-analyze verify "$work/$name" 2>&1)"; then rc=0; else rc=$?; fi
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "FAIL $name: systemd-analyze verify:" >&2
        echo "$out" >&2
        fail=1
    fi
    for line in "${REQUIRED[@]}"; do
        grep -qxF "$line" "$unit" || {
            echo "FAIL $name: missing the line '$line'" >&2
            fail=1
        }
    done
    if ! systemd-analyze security --offline=yes --threshold="$MAX_EXPOSURE" "$work/$name" \
        >"$work/security.txt" 2>&1; then
        echo "FAIL $name: exposure above $MAX_EXPOSURE:" >&2
        tail -n 3 "$work/security.txt" >&2
        fail=1
    fi
    if [ "$fail" -eq 0 ]; then
        echo "ok $name: verify clean; $(tail -n 1 "$work/security.txt")"
    else
        status=1
    fi
done
exit $status
