"""The main job: `./run-main.sh` with no flags.

Until the shipped agents exist this runs the simulation report on the default scenario; the
evaluation of the shipped checkpoints against the baselines replaces it once they land.
"""

from __future__ import annotations

import sys

from scripts import simulate


def main(argv: list[str] | None = None) -> int:
    """Run the main job on the embedded default."""
    return simulate.main(list(argv) if argv is not None else ["--scenario", "small_faults"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or None))
