#!/usr/bin/env bash
# Install everything (scripts/setup.sh) and run the whole test suite against the real CPU
# Triton server, then the sanitizer pass: the tests that drive the C++ detokenizer hardest
# (many streams, disconnects, cancellation, faults, fuzz) with it compiled under
# AddressSanitizer and UndefinedBehaviorSanitizer in every server; any report fails the run.
# Extra arguments go to pytest instead (one run, no sanitizer pass), e.g.
# scripts/test.sh -k launcher
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
if [ "$#" -gt 0 ]; then
  exec "$root/.venv/bin/python" -m pytest "$@"
fi
# These run once, in the sanitizer pass below (the same code as the served library, with
# its test hooks, under the sanitizers); every other serving test runs the served library.
sanitizer_tests=(
  tests/test_detokenizer_hardening.py
  tests/test_cpp_detokenizer.py
  tests/test_many_streams.py
  tests/test_disconnects.py
  tests/test_fuzz_models.py
  tests/test_sequences_and_log_probs.py
)
# The load-testing tools' and the image-compat venvs install in the background while the
# suite starts: the tests that use them wait on scripts/tools-venv.sh's lock (and install
# them themselves, showing why, if this failed).
"$root/scripts/tools-venv.sh" genai-perf aiperf image-compat >"$(mktemp -t mixtral-triton-tools-venv.XXXXXX)" 2>&1 &
"$root/.venv/bin/python" -m pytest "${sanitizer_tests[@]/#/--ignore=}"
wait || true  # the background install: the tests above already needed what it made
reports="$(mktemp -d -t mixtral-triton-sanitizer.XXXXXX)"
echo "sanitizer pass: the detokenizer under AddressSanitizer + UBSan; reports go to $reports"
MIXTRAL_TRITON_DETOKENIZER_FLAVOUR=sanitize MIXTRAL_TRITON_SANITIZER_REPORTS="$reports" \
  exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider "${sanitizer_tests[@]}"
