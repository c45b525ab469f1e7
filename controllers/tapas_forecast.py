"""TAPAS heeding the shield's forecast: the rule-based controller a thermal agent must beat.

The TAPAS-style controller (`controllers.tapas`) decides from the rows' present load; the shield
(`controllers.shield`) judges the coming interval from a prediction with a burst allowance and
overrides TAPAS in most intervals of the TAPAS scenarios. This controller asks the same
prediction before it acts (`Shield.forecast`, a shield of its own that judges nothing) and
heeds it: every row's clock ceiling at most the highest one the forecast allows where a lower
clock helps, and each VM TAPAS places moved where the forecast says it fits (it waits where no
server does). Routing and quantization stay TAPAS's. It is the baseline that shows what the
forecast alone buys, so that a learned thermal agent's result is not credited to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from llm_cluster_gym.controllers.base import RuleBasedController
from llm_cluster_gym.controllers.context import ControllerContext
from llm_cluster_gym.controllers.shield import Shield, ShieldForecast, heed_forecast_placements
from llm_cluster_gym.controllers.tapas import TapasController
from llm_cluster_gym.envs.backend import ClusterAction, Telemetry


def heed_forecast(action: ClusterAction, forecast: ShieldForecast) -> ClusterAction:
    """`action` with its row ceilings and placements as the forecast allows."""
    cap = action.row_freq_cap_mhz
    if cap is not None:
        cap = np.asarray(cap, dtype=float)
        cap = np.where(forecast.rows_to_lower, np.minimum(cap, forecast.safe_row_freq_mhz), cap)
    servers = action.vm_servers
    if servers:
        servers = heed_forecast_placements(tuple(servers), forecast)
    return replace(action, row_freq_cap_mhz=cap, vm_servers=servers)


class TapasForecastController(RuleBasedController):
    """TAPAS whose ceilings and placements heed the shield's forecast (thermal and combined tasks).

    Args:
        ctx: Static description of the env.
        telemetry: Callable returning the latest `Telemetry` (``env.backend.telemetry``).
        pool_controller: As `TapasController`'s (combined task).
    """

    name = "tapas_forecast"

    def __init__(self, ctx: ControllerContext, telemetry: Callable[[], Telemetry],
                 pool_controller=None) -> None:
        super().__init__(ctx)
        self.tapas = TapasController(ctx, pool_controller=pool_controller)
        self.forecaster = Shield.forecaster(ctx, telemetry)

    def reset(self) -> None:
        """Forget TAPAS's history and the forecast's power history."""
        self.tapas.reset()
        self.forecaster.reset()

    def decide(self, observation: np.ndarray, action_mask: np.ndarray | None = None) -> ClusterAction:
        """TAPAS's decision, heeding the forecast for it."""
        base = self.tapas.decide(observation, action_mask)
        return heed_forecast(base, self.forecaster.forecast(observation, base, action_mask))
