#!/usr/bin/env bash
# Installs what the browser test needs, only when missing: Chromium from Debian's
# packages (playwright's own browser download does not work everywhere, and is not
# needed: playwright-core drives the system Chromium) and the npm packages from the
# lockfile. Safe to run again: it does nothing when everything is there.
set -euo pipefail
cd "$(dirname "$0")"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

chromium_path() {
  for candidate in "${CHROMIUM_PATH:-}" /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then echo "$candidate"; return 0; fi
  done
  return 1
}

if ! chromium_path >/dev/null; then
  echo "browser test: installing Chromium (Debian package)" >&2
  as_root apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium >&2
fi
chromium_path >/dev/null || { echo "browser test: no Chromium after installing it" >&2; exit 1; }

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "browser test: installing Node.js and npm (Debian packages)" >&2
  as_root apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nodejs npm >&2
fi

# npm ci when node_modules is missing or older than the lockfile.
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "browser test: npm ci" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
