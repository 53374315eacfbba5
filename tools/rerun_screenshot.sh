#!/usr/bin/env bash
# Screenshot of a recording's first screen in the real rerun 0.36.3 web viewer, for the README:
#   tools/rerun_screenshot.sh demo.rrd [assets/rerun_demo.png] [--click X,Y ...]
# Installs what it needs once: Debian's chromium, and rerun-sdk 0.36.3 + playwright in a venv
# under target/ (playwright drives the system chromium; it downloads no browser).
# A tool for people, not a CI step: the viewer needs about a minute to start under SwiftShader.
set -euo pipefail
cd "$(dirname "$0")/.."
rrd=${1:?usage: tools/rerun_screenshot.sh FILE.rrd [OUT.png] [options]}
png=${2:-assets/rerun_demo.png}
shift $(( $# >= 2 ? 2 : 1 ))
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq chromium
fi
venv=target/rerun-shot-venv
if [ ! -x "$venv/bin/rerun" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q rerun-sdk==0.36.3 playwright
fi
export RERUN_ANALYTICS=0
"$venv/bin/rerun" analytics disable >/dev/null 2>&1 || true
"$venv/bin/python" tools/rerun_screenshot.py "$rrd" "$png" --rerun "$venv/bin/rerun" --chromium "$(command -v chromium)" "$@"
