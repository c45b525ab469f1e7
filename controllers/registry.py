"""Build controllers by name: `make_controller(name, env)` for compare, evaluation, deployment.

Names: ``static``, ``unaware``, ``dynamo``, ``tapas``, ``tapas_forecast`` (TAPAS heeding the
shield's forecast, `controllers.tapas_forecast`), ``oracle`` and ``milp`` (simulated
backend only; they read the future: ``milp`` replays the offline MILP plan of
`controllers.milp_plan`), ``random`` (uniform over the action space, for tests); prefix
``shield:`` wraps any of them in the safety shield (e.g. ``shield:dynamo``). For the combined
task ``tapas`` drives the pools with the DynamoLLM manager. The names are policy specs of
`controllers.policy_spec` (which also names trained checkpoints, ``ckpt:<dir>``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.dynamo import DynamoController
from llm_cluster_gym.controllers.milp_plan import PlanController
from llm_cluster_gym.controllers.oracle import OracleController
from llm_cluster_gym.controllers.policy_spec import PolicySpecError, parse_policy_spec
from llm_cluster_gym.controllers.shield import Shield
from llm_cluster_gym.controllers.static import StaticController
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.controllers.tapas_forecast import TapasForecastController
from llm_cluster_gym.controllers.unaware import UnawareController

CONTROLLERS = ("static", "unaware", "dynamo", "tapas", "tapas_forecast", "oracle", "milp", "random")


class RandomController:
    """Uniformly random actions (legal placements only when a mask is given)."""

    name = "random"

    def __init__(self, nvec: np.ndarray, rng: np.random.Generator) -> None:
        self.nvec = np.asarray(nvec, dtype=np.int64)
        self.rng = rng

    def reset(self) -> None:
        """Nothing to forget (the generator keeps running)."""

    def act(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> np.ndarray:
        """One uniform draw per dimension."""
        return (self.rng.random(len(self.nvec)) * self.nvec).astype(np.int64)


def make_controller(name: str, env: Any, ctx: ControllerContext | None = None,
                    seed: int = 0) -> Any:
    """A controller for `env` by name (see the module docstring).

    Raises:
        PolicySpecError: Unknown name, or a checkpoint spec (build those with
            `controllers.policy_spec.make_policy`).
        ValueError: A controller that does not fit the env's task.
    """
    spec = parse_policy_spec(name)
    if spec.controller is None:
        raise PolicySpecError(f"policy {name!r} is a checkpoint, not a controller name "
                              "(controllers.policy_spec.make_policy builds it)")
    base = getattr(env, "unwrapped", env)
    ctx = ctx or ControllerContext.from_env(base)
    if spec.shield:
        inner = make_controller(spec.controller, env, ctx, seed)
        return Shield(inner, ctx, base.backend.telemetry)
    name = spec.controller
    if name == "static":
        return StaticController(ctx)
    if name == "unaware":
        return UnawareController(ctx)
    if name == "dynamo":
        if not ctx.codec.has_pools:
            raise ValueError(f"controller 'dynamo' needs pool actions; task is {ctx.task!r}")
        return DynamoController(ctx)
    if name == "tapas":
        if not ctx.codec.has_rows:
            raise ValueError(f"controller 'tapas' needs row actions; task is {ctx.task!r}")
        pools = DynamoController(ctx) if ctx.codec.has_pools else None
        return TapasController(ctx, pool_controller=pools)
    if name == "tapas_forecast":
        if not ctx.codec.has_rows:
            raise ValueError(f"controller 'tapas_forecast' needs row actions; task is {ctx.task!r}")
        pools = DynamoController(ctx) if ctx.codec.has_pools else None
        return TapasForecastController(ctx, base.backend.telemetry, pool_controller=pools)
    if name == "oracle":
        if not ctx.codec.has_pools:
            raise ValueError(f"controller 'oracle' needs pool actions; task is {ctx.task!r}")
        return OracleController(ctx, base)
    if name == "milp":
        if not ctx.codec.has_pools:
            raise ValueError(f"controller 'milp' needs pool actions; task is {ctx.task!r}")
        return PlanController(ctx, base)
    return RandomController(base.action_space.nvec, np.random.default_rng(seed))  # name == "random"


def policy_maker(name: str, seed: int = 0) -> Any:
    """A factory ``env -> controller`` for a controller name (what episode runners take)."""

    def make(env: Any) -> Any:
        return make_controller(name, env, seed=seed)

    return make
