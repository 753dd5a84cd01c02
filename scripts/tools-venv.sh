#!/usr/bin/env bash
# Virtual environments beside .venv for what cannot share its pins, installed from exact pins
# and reused while those pins are unchanged (a stamp, as scripts/setup.sh does):
#   genai-perf    .venv-genai-perf: genai-perf 0.0.16 (scripts/requirements-genai-perf.txt).
#                 Its bin/perf_analyzer runs ours (.venv/bin/mixtral-triton-perf-analyzer), the
#                 binary genai-perf drives; PyPI's perf_analyzer package is an empty placeholder.
#   aiperf        .venv-aiperf: aiperf 0.13.0 (scripts/requirements-aiperf.txt), genai-perf's
#                 successor; it sends its requests itself and needs nothing from .venv.
#   image-compat  .venv-image-compat: the GPU image's versions of what our serving code
#                 imports (deploy/image/requirements-compat.txt), on Python 3.12 as in the
#                 image when this machine has it (pyenv), else python3; this project is
#                 installed into it without its own pins.
# Usage: scripts/tools-venv.sh NAME...   (prints nothing when everything is in place)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"  # genai-perf runs .venv's perf_analyzer

python_3_12() {
  local candidate
  for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv, ensurepip' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  command -v "${PYTHON:-python3}"
}

pip_install() {
  # Machines with local package mirrors configured warn about every absent mirror folder.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

for name in "$@"; do
  case "$name" in
    genai-perf) python="${PYTHON:-python3}"; requirements="$root/scripts/requirements-genai-perf.txt" ;;
    aiperf) python="${PYTHON:-python3}"; requirements="$root/scripts/requirements-aiperf.txt" ;;
    image-compat) python="$(python_3_12)"; requirements="$root/deploy/image/requirements-compat.txt" ;;
    *) echo "tools-venv: unknown environment '$name' (genai-perf, aiperf, image-compat)" >&2; exit 2 ;;
  esac
  venv="$root/.venv-$name"
  # One install of a venv at a time: scripts/test.sh builds them in the background while the
  # tests that use them may ask for them too (they then wait here, and find them in place).
  mkdir -p "$root/.cache"
  exec 9>"$root/.cache/tools-venv-$name.lock"
  flock 9
  if [ ! -x "$venv/bin/python" ]; then
    echo "tools-venv: creating $venv ($("$python" --version))"
    "$python" -m venv "$venv"
  fi
  stamp="$venv/.setup-stamp"
  want="$(cat "$requirements" "$venv/pyvenv.cfg" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "tools-venv: installing $requirements into $venv"
    pip_install -r "$requirements"
    if [ "$name" = image-compat ]; then
      pip_install --no-deps -e "$root"
    fi
    echo "$want" > "$stamp"
  fi
  if [ "$name" = genai-perf ]; then
    printf '#!/bin/sh\n# genai-perf runs `perf_analyzer`: this project'"'"'s, with its libraries found.\nexec "%s" "$@"\n' \
      "$root/.venv/bin/mixtral-triton-perf-analyzer" > "$venv/bin/perf_analyzer"
    chmod +x "$venv/bin/perf_analyzer"
  fi
  exec 9>&-
done
