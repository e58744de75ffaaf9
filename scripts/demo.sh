#!/usr/bin/env bash
# The main job on the local default: validate and render the example fleet.
# (Grows with the engine and the daemon: lab hosts, apply, drift mail.)
set -euo pipefail
cd "$(dirname "$0")/.."
reconciler validate fleet-repo-example
out=$(mktemp -d /tmp/reconciler-render.XXXXXX)
reconciler render fleet-repo-example --all --out "$out"
echo "rendered every host's desired files under $out"
