#!/usr/bin/env bash
# Install everything (scripts/setup.sh), build the embedded default (the tiny Mixtral on
# CPU) and serve it with the real Triton server until Ctrl-C. Options: --help.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/python" -m mixtral_triton.serve_local "$@"
