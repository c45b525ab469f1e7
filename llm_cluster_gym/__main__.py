"""`python -m llm_cluster_gym ...` is the `llm-cluster` command."""

from __future__ import annotations

import sys

from llm_cluster_gym.scripts.cli import main

if __name__ == "__main__":
    sys.exit(main())
