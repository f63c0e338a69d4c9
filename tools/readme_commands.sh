#!/usr/bin/env bash
# Prints the commands of README.md's first code block, one a line, without
# their trailing comments: the newcomer's two commands, which .ci/run runs
# exactly as written so the README cannot drift from what works.
set -euo pipefail
cd "$(dirname "$0")/.."
awk '/^```/ { if (inside) exit; inside = 1; next } inside' README.md | sed -E 's/[[:space:]]+#.*$//; /^[[:space:]]*$/d'
