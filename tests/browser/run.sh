#!/usr/bin/env bash
# The browser test: installs its prerequisites when missing, then runs it against the
# built binary (RLS_RELAY_BIN, default target/debug/rls-relay as `cargo test` builds it).
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh
root="$(cd ../.. && pwd)"
export RLS_RELAY_BIN="${RLS_RELAY_BIN:-$root/target/debug/rls-relay}"
if [ "$RLS_RELAY_BIN" = "$root/target/debug/rls-relay" ]; then
  # The binary as `cargo test` builds it (same features: no rebuild after `make test`'s
  # cargo step; a no-op when it is up to date).
  (cd "$root" && cargo test --locked --no-run --quiet >&2)
fi
# Node's default reporter: spec on a terminal, TAP otherwise.
exec node --test demo.test.mjs
