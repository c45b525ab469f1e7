"""The main job (`./run-main.sh`, no flags): evaluate the shipped agents against the baselines.

Runs `scripts.evaluate` with its defaults — the energy agent (DynamoLLM task) against static,
the DynamoLLM-style manager and the hindsight oracle, and the thermal agent (TAPAS task, at
1.6x oversubscription) against the unaware and TAPAS-style baselines, each inside the safety
shield and raw, on held-out trace windows, three seeds, request-level model — prints the tables
and writes `reports/evaluation/report.md` with its plots.
"""

from __future__ import annotations

import sys

from llm_cluster_gym.scripts import evaluate


def main(argv: list[str] | None = None) -> int:
    """Run the main job (any arguments are passed to `scripts.evaluate`)."""
    return evaluate.main(list(argv) if argv else [])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
