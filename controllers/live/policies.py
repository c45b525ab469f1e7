"""Building the policy the live loop runs: a rule-based controller or a checkpoint, shielded.

Policy specs (`controllers.policy_spec`): a registry name (``static``, ``unaware``, ``dynamo``,
``tapas``, ``random``; see ``controllers/registry.py``) or ``ckpt:<dir>`` (a trained agent saved
by ``agents/checkpoint.py``, loaded through ``agents.policy.load_policy``: a residual agent over
its rule-based base on any scenario of its task, an agent trained from scratch on its own). Unless told
otherwise the policy runs inside the safety shield, and a rule-based fallback (shielded too)
is built beside it for when the policy raises.

The operator's static knowledge (:class:`controllers.context.ControllerContext`) comes from the
backend's description. On the real node there is no scenario file, so `RealCluster.describe`
assembles it from what is measured: the profile fitted to the H100 worker
(``envs/data/real/llama3-8b-real_h100_tp1.json``), the thermal fit of the same recordings, the
trace's request-length statistics, and a server power model with no overhead (RealCluster's
row power is the sum of GPU power).
"""

from __future__ import annotations

from typing import Any

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.policy_spec import PolicySpecError, parse_policy_spec
from llm_cluster_gym.controllers.registry import make_controller
from llm_cluster_gym.controllers.shield import Shield
from llm_cluster_gym.controllers.static import StaticController


def context_for(env: Any) -> ControllerContext:
    """The controller context of a simulated or real env (from its backend's description).

    On the real node there is no scenario file; `RealCluster.describe` gives what is measured.
    """
    return ControllerContext.from_env(env.unwrapped)


def build_policy(spec: str, env: Any, shield: bool = True, seed: int = 0,
                 ctx: ControllerContext | None = None) -> tuple[Any, Any]:
    """The policy named by ``spec`` and its rule-based fallback, both shielded if asked.

    Args:
        spec: Policy spec (`controllers.policy_spec`): registry name or ``[shield:]ckpt:<dir>``.
        env: The ClusterEnv the loop drives (its backend's ``telemetry`` feeds the shield).
        shield: Wrap in the safety shield.
        seed: Seed of randomized controllers.
        ctx: Controller context (default: :func:`context_for`).

    Returns:
        (policy, fallback); the fallback is the static baseline (TAPAS-style when the task
        has row actions), used when the policy raises.

    Raises:
        PolicySpecError: Unknown name or unreadable checkpoint.
    """
    base = getattr(env, "unwrapped", env)
    ctx = ctx or context_for(base)
    tel = base.backend.telemetry
    parsed = parse_policy_spec(spec)
    shield = shield or parsed.shield
    if parsed.checkpoint is not None:
        try:
            from llm_cluster_gym.agents.policy import load_policy
        except ImportError as exc:
            raise PolicySpecError(f"policy {spec!r}: agents.policy is not available ({exc})") from exc
        try:  # a residual agent on any scenario of its task; one trained from scratch on its own
            inner = load_policy(parsed.checkpoint, base)
        except (OSError, ValueError, KeyError) as exc:
            raise PolicySpecError(f"policy {spec!r}: cannot load checkpoint ({exc})") from exc
    else:
        try:
            inner = make_controller(parsed.controller, base, ctx, seed)
        except PolicySpecError:
            raise
        except ValueError as exc:
            raise PolicySpecError(f"policy {spec!r}: {exc}") from exc
    if ctx.codec.has_rows:
        from llm_cluster_gym.controllers.tapas import TapasController

        fb: Any = TapasController(ctx)
    else:
        fb = StaticController(ctx)
    if shield:
        return Shield(inner, ctx, tel), Shield(fb, ctx, tel)
    return inner, fb
