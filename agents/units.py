"""Evaluation units run in this process or in spawned worker processes, results in unit order.

An evaluation (`residual-eval`, `thermal-eval`) is a list of independent units (a day and a
seed, a scenario and a seed), each a call of a module-level function on picklable arguments.
`map_units` runs them one after another or `jobs` at a time; the rows are the same either way
and come back in the order of the units.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any


def map_units(fn: Callable[..., Any], units: Sequence[tuple], jobs: int = 1,
              log: Callable[[Any], None] | None = None) -> list[Any]:
    """``[fn(*unit) for unit in units]``, with `jobs` worker processes when `jobs` > 1.

    Workers are spawned, not forked: a fork of a process whose torch threads already ran
    deadlocks in the child. `log` gets each result as it arrives (in unit order).
    """
    rows: list[Any] = []
    if jobs <= 1 or len(units) <= 1:
        for unit in units:
            rows.append(fn(*unit))
            if log:
                log(rows[-1])
        return rows
    with ProcessPoolExecutor(max_workers=min(jobs, len(units)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(fn, *zip(*units, strict=True)):
            rows.append(row)
            if log:
                log(row)
    return rows
