#!/usr/bin/env bash
# Create the virtual environment if needed, install the project, run the main job on the
# embedded default scenario (`llm-cluster main`: evaluate the shipped agents against the baselines).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/llm-cluster main "$@"
