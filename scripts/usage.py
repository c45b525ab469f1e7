"""`UsageError`: a command-line option that is malformed or out of range.

Raised by the argument dataclasses of the `llm-cluster` subcommands (in ``__post_init__``, so
before any work starts) and by their `run` functions; `scripts.cli` prints it as one line and
exits with status 2.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A command-line option is malformed or out of range (the message names the option)."""
