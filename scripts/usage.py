"""`UsageError` and the checks of command-line options shared by the `llm-cluster` subcommands.

`UsageError` is raised by the argument dataclasses of the subcommands (in ``__post_init__``,
so before any work starts) and by their `run` functions; `scripts.cli` prints it as one line
and exits with status 2. `check_seed`, `check_seeds` and `check_number` are the checks every
subcommand applies the same way (seeds in ``[0, MAX_SEED]``, numbers finite and in range).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MAX_SEED = 2**31 - 1
"""Largest seed accepted (numpy's legacy seeding, used by stable-baselines3, stops at 2**32 - 1,
and training adds offsets to the seed)."""


class UsageError(ValueError):
    """A command-line option is malformed or out of range (the message names the option)."""


def check_seed(option: str, seed: int) -> None:
    """Raise `UsageError` unless ``0 <= seed <= MAX_SEED``."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{option} must be between 0 and {MAX_SEED}, got {seed}")


def check_seeds(option: str, seeds: Iterable[int]) -> None:
    """`check_seed` for every seed of a list option (and at least one seed)."""
    seeds = list(seeds)
    if not seeds:
        raise UsageError(f"{option} needs at least one seed")
    for s in seeds:
        check_seed(option, s)


def check_number(option: str, value: float | None, *, above: float | None = None,
                 at_least: float | None = None, at_most: float | None = None) -> None:
    """Raise `UsageError` unless `value` is None or finite and within the bounds given.

    Args:
        option: The option's flag, named in the message (``--duration-s``).
        value: The value (None: the option was not given; nothing to check).
        above: Exclusive lower bound.
        at_least: Inclusive lower bound.
        at_most: Inclusive upper bound.
    """
    if value is None:
        return
    bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]
    want = " and ".join(b for b in bounds if b)
    ok = (math.isfinite(value) and (above is None or value > above)
          and (at_least is None or value >= at_least) and (at_most is None or value <= at_most))
    if not ok:
        raise UsageError(f"{option} must be a finite number{' ' + want if want else ''}, got {value}")
