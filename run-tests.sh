#!/usr/bin/env bash
# Create the virtual environment if needed, install the project with its test extras, run the tests.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m ruff check llm_cluster_gym envs agents controllers scripts bench tests
.venv/bin/python -m pytest -q "$@"
