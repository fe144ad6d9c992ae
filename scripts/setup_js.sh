#!/usr/bin/env bash
# What the JavaScript app tests need (tests/test_node_app.py, tests/test_browser_app.py):
#   - Node.js and npm, and Debian's Chromium at /usr/bin/chromium: installed with apt-get
#     where missing, when running as root with apt-get (otherwise skipped quietly: the tests
#     then skip with a reason);
#   - `npm ci` in every examples/*/ that has a package-lock.json (exact pinned versions),
#     skipped where node_modules already matches that lock file.
# onnxruntime-node's postinstall would download CUDA binaries from outside the npm registry;
# ONNXRUNTIME_NODE_INSTALL=skip keeps to the CPU binaries the package ships.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_js: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup_js: not installing ${missing[*]} (needs root and apt-get)" >&2
  fi
fi

if ! command -v npm >/dev/null 2>&1; then
  echo "setup_js: npm is missing; the JavaScript app tests will skip" >&2
  exit 0
fi
# playwright-core 1.65 and transformers.js 4.3 (sharp) need Node.js >= 20.9; Debian 12's own
# nodejs package is 18: the tests then skip, saying so.
if ! node -e 'const [a, b] = process.versions.node.split(".").map(Number); process.exit(a > 20 || (a === 20 && b >= 9) ? 0 : 1)'; then
  echo "setup_js: node $(node --version) is older than 20.9; the JavaScript app tests will skip" >&2
  exit 0
fi

export ONNXRUNTIME_NODE_INSTALL=skip
for lock in examples/*/package-lock.json; do
  [ -e "$lock" ] || continue
  dir="$(dirname "$lock")"
  stamp="$dir/node_modules/.setup_js.sha256"
  sum="$(sha256sum "$lock" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
    continue
  fi
  echo "setup_js: npm ci in $dir"
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
  echo "$sum" >"$stamp"
done
