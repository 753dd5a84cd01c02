#!/usr/bin/env bash
# Install everything this project needs on a fresh Debian/Ubuntu machine with Python >= 3.11:
# Debian's libb64 (perf_analyzer links it), g++ where missing (the fill compiles the C++
# detokenizer, the served postprocessing model, with it), and a virtual environment in
# .venv with the pinned packages of pyproject.toml and this project installed editable.
# Idempotent: a second run with an unchanged pyproject.toml prints nothing and does nothing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MIXTRAL_TRITON_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

debian=()
dpkg -s libb64-0d >/dev/null 2>&1 || debian+=(libb64-0d)
command -v g++ >/dev/null 2>&1 || debian+=(g++)
if [ "${#debian[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's ${debian[*]} (perf_analyzer links libb64; the C++ detokenizer compiles with g++)"
    sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${debian[@]}" >/dev/null
  else
    echo "setup: warning: ${debian[*]} missing and apt-get is not available; perf_analyzer or the C++ detokenizer will not run" >&2
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating virtual environment $venv"
  "$python" -m venv "$venv"
fi

# Re-install only when the pinned set or the interpreter changed.
stamp="$venv/.setup-stamp"
want="$(cat "$root/pyproject.toml" "$venv/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing pinned packages into $venv (first run takes about a minute)"
pip_install() {
  # Machines with local package mirrors configured warn about every absent mirror folder.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
pip_install -e "${root}[test,bench]"
echo "$want" > "$stamp"
echo "setup: done"
