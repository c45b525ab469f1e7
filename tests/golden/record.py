"""Record the golden rollouts that `tests/test_golden.py` checks bit for bit.

Run from the repository root after a change that is *meant* to alter trajectories:

    .venv/bin/python tests/golden/record.py

Each entry is a SHA-256 over the exact bytes of a trajectory: for every registered env id,
40 steps of seeded random actions (observations, rewards and every `info` scalar); for every
rule-based controller, one short simulated episode (every metric of every interval). A refactor
that keeps behaviour keeps every digest. They are recorded on the CPU code paths of
`canonical_cpu` (numpy's baseline loops, OpenBLAS's Nehalem kernels), which every x86-64 CPU
runs alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

GOLDEN = Path(__file__).with_name("rollouts.json")


def main() -> int:
    """Write the digests of the current code to `rollouts.json`."""
    from golden_digests import all_digests  # tests/golden is on sys.path (below)

    GOLDEN.write_text(json.dumps(all_digests(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    import canonical_cpu

    canonical_cpu.apply()  # before numpy is imported: the digests' CPU code paths
    if (why := canonical_cpu.check()) is not None:
        sys.exit(f"record.py: {why}")
    sys.exit(main())
