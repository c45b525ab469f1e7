"""Policy specs: the one text syntax that names a policy on the command line and in sweeps.

Grammar (parsed here and nowhere else)::

    spec       := ["shield:"] (controller | "ckpt:" directory)
    controller := a name of `controllers.registry.CONTROLLERS` (static, unaware, dynamo, tapas,
                  tapas_forecast, oracle, milp, random)

Examples: ``dynamo``, ``shield:dynamo``, ``ckpt:checkpoints/energy``,
``shield:ckpt:checkpoints/thermal``. ``shield:`` wraps the policy in the safety shield
(`controllers.shield.Shield`); ``ckpt:<dir>`` is a trained agent saved by
`agents.checkpoint` and loaded through `agents.policy.TrainedPolicy`. Compare, evaluate, sweep
and deploy all read specs with `parse_policy_spec`; `make_policy` builds the controller a spec
names for a simulated env.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHIELD_PREFIX = "shield:"
"""Prefix that wraps a policy in the safety shield (``shield:dynamo``)."""

CHECKPOINT_PREFIX = "ckpt:"
"""Prefix of a trained checkpoint directory (``ckpt:checkpoints/energy``)."""


class PolicySpecError(ValueError):
    """A policy spec is malformed or names no known policy (the message names the spec)."""


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy spec.

    Attributes:
        controller: Registry name of a rule-based controller, or None for a checkpoint.
        checkpoint: Checkpoint directory of a trained agent, or None for a controller.
        shield: Whether the spec asks for the safety shield (``shield:`` prefix).
    """

    controller: str | None = None
    checkpoint: Path | None = None
    shield: bool = False

    def __str__(self) -> str:
        """The spec as text (``parse_policy_spec(str(spec)) == spec``)."""
        inner = self.controller if self.checkpoint is None else f"{CHECKPOINT_PREFIX}{self.checkpoint}"
        return f"{SHIELD_PREFIX}{inner}" if self.shield else str(inner)


def parse_policy_spec(text: str) -> PolicySpec:
    """Parse a policy spec (see the module docstring).

    Raises:
        PolicySpecError: Empty text, a doubled ``shield:``, an empty checkpoint directory, or a
            name that is neither a known controller nor ``ckpt:<dir>``.
    """
    from llm_cluster_gym.controllers.registry import CONTROLLERS

    rest = text.strip()
    shield = rest.startswith(SHIELD_PREFIX)
    if shield:
        rest = rest[len(SHIELD_PREFIX):]
        if rest.startswith(SHIELD_PREFIX):
            raise PolicySpecError(f"policy {text!r}: 'shield:' is given twice")
    if rest.startswith(CHECKPOINT_PREFIX):
        directory = rest[len(CHECKPOINT_PREFIX):]
        if not directory:
            raise PolicySpecError(f"policy {text!r}: 'ckpt:' needs a checkpoint directory (ckpt:<dir>)")
        return PolicySpec(checkpoint=Path(directory), shield=shield)
    if rest in CONTROLLERS:
        return PolicySpec(controller=rest, shield=shield)
    hint = ""
    if ":" in rest and rest.split(":", 1)[0] in ("checkpoint", "ckp", "chkpt"):
        hint = f"; a checkpoint is written {CHECKPOINT_PREFIX}{rest.split(':', 1)[1]}"
    raise PolicySpecError(f"policy {text!r}: unknown controller {rest!r}; known: {', '.join(CONTROLLERS)}, "
                          f"or {CHECKPOINT_PREFIX}<dir> for a checkpoint (prefix {SHIELD_PREFIX!r} for the "
                          f"safety shield){hint}")


def make_policy(spec: PolicySpec | str, env: Any, seed: int = 0,
                checkpoint_path: str | Path | None = None, same_scenario: bool = True) -> Any:
    """The controller a spec names, for a simulated `ClusterEnv`.

    Args:
        spec: The spec (text is parsed with `parse_policy_spec`).
        env: The env the policy will act on.
        seed: Seed of controllers that draw random numbers.
        checkpoint_path: Where the checkpoint's files are (default: the directory in the spec).
        same_scenario: Passed to the checkpoint loader (False: the env may run another scenario
            than the one the agent was trained on).

    Raises:
        PolicySpecError: The text is not a valid spec.
        ValueError: The controller does not fit the env's task.
    """
    spec = parse_policy_spec(spec) if isinstance(spec, str) else spec
    if spec.checkpoint is None:
        from llm_cluster_gym.controllers.registry import make_controller

        return make_controller(str(spec), env, seed=seed)
    from llm_cluster_gym.agents.policy import load_policy

    learned = load_policy(checkpoint_path or spec.checkpoint, env, name=str(spec),
                          same_scenario=same_scenario)
    if not spec.shield:
        return learned
    from llm_cluster_gym.controllers.context import ControllerContext
    from llm_cluster_gym.controllers.shield import Shield

    base = env.unwrapped
    return Shield(learned, ControllerContext.from_env(base), base.backend.telemetry)
