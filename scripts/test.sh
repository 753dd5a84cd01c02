#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite against the real
# CPU Triton server. Extra arguments go to pytest, e.g. scripts/test.sh -k launcher
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
