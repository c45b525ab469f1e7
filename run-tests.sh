#!/usr/bin/env bash
# Create the virtual environment if needed, install the project with its test extras, run the tests.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m ruff check llm_cluster_gym envs agents controllers scripts bench tests
# Two workers (the CI machine has 2 cores); a test file stays on one worker (its module fixtures
# are built once). Arguments are passed on: ./run-tests.sh tests/test_env.py -n 0 runs serially.
.venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
