#!/usr/bin/env bash
# Lint (ruff, config in ruff.toml) and run the test suite with the venv's python.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k evaluator -x
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -m "${OVSS_VENV:-$repo/.venv}")"
cd "$repo"
py="$venv/bin/python"
[[ -x "$py" ]] || { echo "no venv at $venv: run bash scripts/setup.sh first" >&2; exit 1; }

# Lint failures fail the run too, but the tests still run so that one run shows both.
lint_rc=0
"$py" -m ruff check . || lint_rc=$?

# No CLIP weights can be downloaded here: make any hub access fail fast instead of hanging.
export HF_HUB_OFFLINE=1
rc=0
start=$SECONDS
# Worker processes, one per core up to 4 (each test file on one worker so that its node processes
# and models are shared by its tests; each worker has a ROS domain of its own), one torch thread
# each (test/conftest.py). --durations=20: the 20 slowest tests at the end of every run.
"$py" -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations=20 test "$@" || rc=$?
echo "test suite: $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
# pytest exits 5 when it collected no test: a suite that ran nothing is a failure.
if [[ $rc == 5 ]]; then echo "pytest collected no tests" >&2; rc=1; fi
if [[ $rc == 0 && $lint_rc != 0 ]]; then echo "ruff check failed" >&2; rc=$lint_rc; fi
exit "$rc"
