"""Clocks and speeds of the simulated instances at one tick, and the GPU load they produce.

The controller's row settings (clock cap, quantization, routing weight) and the instance layout
set each slot's clock, speedup and quality loss (:class:`SlotSettings`, cached by
:class:`SlotSettingsCache` until either changes); the hardware controllers' ceilings
(``envs/sim/throttle.py``) lower the clocks a tick actually runs at (:func:`effective_clocks`);
:func:`slot_model` turns those clocks into the prefill and decode times the serving model uses,
and :func:`gpu_load` spreads each instance's phase mix over its GPUs for the power model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.sim import power as pw
from llm_cluster_gym.envs.sim import power_kernels as pk
from llm_cluster_gym.envs.sim.instances import InstanceTable
from llm_cluster_gym.envs.sim.layout import SlotTables
from llm_cluster_gym.envs.sim.profiles import (
    ProfileArrays,
    decode_iter_time_s,
    freq_at_power_limit_mhz,
    moe_experts_touched,
    phase_power_w,
    prefill_time_s,
    serial_draw_w,
    serial_power_limit_w,
)
from llm_cluster_gym.envs.sim.scenario import ServingSpec
from llm_cluster_gym.envs.sim.serving import TickLoad
from llm_cluster_gym.envs.sim.serving_request import SlotModel
from llm_cluster_gym.envs.sim.throttle import RowPowerCapping, ThermalSlowdown, read_only


@dataclass(frozen=True)
class SlotSettings:
    """Per-slot and per-GPU quantities that change only with the layout or the row settings.

    Attributes:
        f_set_mhz: Slot clock: the pool's frequency under the row's clock cap.
        f_pre_mhz: Slot prefill clock (also within the GPU power limit) with no ceiling in force.
        gpu_freq_mhz: Each GPU's set clock (the maximum where no instance runs).
        gpu_prefill_freq_mhz: Each GPU's prefill clock with no ceiling in force.
        speed: Per-slot quantized speedup, or None when no slot runs quantized.
        qloss: Per-slot quality loss of quantized serving.
        power_factor: Per-GPU dynamic power factor (1.0 when nothing is quantized).
        route_weight: Per-slot routing weight: the slot's row's times its server's.
    """

    f_set_mhz: np.ndarray
    f_pre_mhz: np.ndarray
    gpu_freq_mhz: np.ndarray
    gpu_prefill_freq_mhz: np.ndarray
    speed: np.ndarray | None
    qloss: np.ndarray
    power_factor: np.ndarray | float
    route_weight: np.ndarray


def quantization(slots: SlotTables, inst: InstanceTable, row_quantized: np.ndarray,
                 sv: ServingSpec) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | float]:
    """Per-slot speedup (None: no slot quantized), quality loss, and per-GPU power factor."""
    if not (slots.any_quantized or np.count_nonzero(row_quantized)):
        return None, np.zeros(inst.n_slots), 1.0
    quant = (row_quantized[slots.row] & inst.active) | inst.quantized
    speed = np.where(quant, sv.quantized_speedup, 1.0)
    qloss = np.where(quant, sv.quantized_quality_loss, 0.0)
    power_factor = np.where(slots.gpu_has & quant[slots.gpu_o], sv.quantized_power_factor, 1.0)
    return speed, qloss, power_factor


def slot_settings(slots: SlotTables, inst: InstanceTable, row_freq_cap_mhz: np.ndarray,
                  row_quantized: np.ndarray, row_route_weight: np.ndarray, sv: ServingSpec,
                  max_mhz: float, server_route_weight: np.ndarray | None = None) -> SlotSettings:
    """Clocks, quantization and routing weight per slot (and GPU) from the current settings.

    `server_route_weight` is per server (all servers; None: 1 everywhere).
    """
    has, o = slots.gpu_has, slots.gpu_o
    # Set clock: the pool's frequency under the row's clock cap (action).
    f_set = np.minimum(slots.freq_mhz, row_freq_cap_mhz[slots.row])
    f_pre = np.minimum(f_set, slots.prefill_limit_mhz)
    speed, qloss, power_factor = quantization(slots, inst, row_quantized, sv)
    return SlotSettings(
        f_set_mhz=f_set,
        f_pre_mhz=f_pre,
        gpu_freq_mhz=read_only(np.where(has, f_set[o], max_mhz)),
        gpu_prefill_freq_mhz=read_only(np.where(has, np.minimum(f_pre[o], f_set[o]), max_mhz)),
        speed=speed,
        qloss=qloss,
        power_factor=power_factor,
        route_weight=(row_route_weight[slots.row] if server_route_weight is None else
                      row_route_weight[slots.row]
                      * server_route_weight[inst.slot_gpu // inst.gpus_per_server]),
    )


class SlotSettingsCache:
    """The slot settings of the current layout and row settings, recomputed only on a change.

    The row settings are compared by value: a controller that repeats its decision every
    interval costs one comparison per tick, not the per-slot recomputation.
    """

    def __init__(self, sv: ServingSpec, max_mhz: float) -> None:
        self.sv, self.max_mhz = sv, max_mhz
        self._key: tuple | None = None
        self._value: SlotSettings | None = None

    def get(self, slots: SlotTables, inst: InstanceTable, row_freq_cap_mhz: np.ndarray,
            row_quantized: np.ndarray, row_route_weight: np.ndarray,
            server_route_weight: np.ndarray | None = None) -> SlotSettings:
        """The settings for this layout (``slots``, compared by identity) and row settings."""
        key = (slots, row_freq_cap_mhz.tobytes(), row_quantized.tobytes(),
               row_route_weight.tobytes(),
               None if server_route_weight is None else server_route_weight.tobytes())
        if key != self._key:
            self._value = slot_settings(slots, inst, row_freq_cap_mhz, row_quantized,
                                        row_route_weight, self.sv, self.max_mhz,
                                        server_route_weight)
            self._key = key
        return self._value


def effective_clocks(st: SlotSettings, slots: SlotTables, inst: InstanceTable,
                     slowdown: ThermalSlowdown, capping: RowPowerCapping, gpu_row: np.ndarray,
                     max_mhz: float) -> tuple[np.ndarray, ...]:
    """Per-slot effective and prefill clocks, per-GPU prefill clock and clock ceiling.

    The effective clock is the set clock under the power-capping and thermal-slowdown
    ceilings of the slot's GPUs; prefill also stays within the GPU power limit.
    """
    if not (slowdown.any_throttled or capping.any_capped):
        # No clock ceiling anywhere (the common case): skip the per-GPU reduction.
        return st.f_set_mhz, st.f_pre_mhz, st.gpu_prefill_freq_mhz, slowdown.no_ceiling_mhz
    o = slots.gpu_o
    gpu_ceiling = np.minimum(slowdown.ceiling_mhz, capping.ceiling_mhz[gpu_row])
    slot_ceiling = np.full(inst.n_slots, max_mhz)
    valid = slots.owner >= 0
    np.minimum.at(slot_ceiling, slots.owner[valid], gpu_ceiling[inst.slot_gpu[valid]])
    f_eff = np.minimum(st.f_set_mhz, slot_ceiling)
    f_pre = np.minimum(f_eff, slots.prefill_limit_mhz)
    gpu_prefill_mhz = np.where(slots.gpu_has, np.minimum(f_pre[o], st.f_set_mhz[o]), max_mhz)
    return f_eff, f_pre, gpu_prefill_mhz, gpu_ceiling


def slot_model(slots: SlotTables, f_pre: np.ndarray, f_eff: np.ndarray,
               speed: np.ndarray | None) -> SlotModel:
    """Prefill and decode timing of the slots at this tick's clocks (and quantized speedup)."""
    sp = slots.prof

    def prefill(tok: np.ndarray, i: np.ndarray) -> np.ndarray:
        return prefill_time_s(tok, f_pre[i], sp.prefill_p0_s[i], sp.prefill_p1_s_per_token[i],
                              sp.prefill_p2_s_per_token2[i], sp.prefill_phi[i], sp.max_freq_mhz[i])

    def decode(b: np.ndarray, c: np.ndarray, i: np.ndarray) -> np.ndarray:
        return decode_iter_time_s(b, c, f_eff[i], sp.decode_d0_s[i], sp.decode_d1_s_per_seq[i],
                                  sp.decode_d2_s_per_seq_token[i], sp.decode_phi[i],
                                  sp.max_freq_mhz[i], sp.decode_d3_s_per_expert[i],
                                  sp.decode_moe_experts_per_active[i])

    if speed is None:  # no slot runs quantized: every speedup is 1
        return SlotModel(prefill, decode, slots.kv_tokens)
    return SlotModel(lambda tok, i: prefill(tok, i) / speed[i],
                     lambda b, c, i: decode(b, c, i) / speed[i], slots.kv_tokens)


class SlotModelCache:
    """`slot_model` with each slot's clock slowdown computed once per layout and clock set.

    The prefill and decode times are the profile formulas of `envs.sim.profiles`, evaluated
    element by element exactly as `slot_model` does (the same operations in the same order, so
    the same bits); only the clock slowdown of every slot is computed when the layout or the
    clocks change (by identity: the settings cache returns the same arrays until then), not on
    every call. Clocks that are not all positive fall back to `slot_model` (which raises on
    the slots a call asks for).
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: SlotModel | None = None

    def __getstate__(self) -> dict:
        """Pickle and deep-copy without the cached closures (rebuilt on the next call)."""
        return {"_key": None, "_value": None}

    def get(self, slots: SlotTables, f_pre: np.ndarray, f_eff: np.ndarray,
            speed: np.ndarray | None) -> SlotModel:
        """The tick's `SlotModel` (the cached one while the four inputs are the same objects)."""
        key = self._key
        if (key is not None and key[0] is slots and key[1] is f_pre and key[2] is f_eff
                and key[3] is speed):
            return self._value
        if (f_pre > 0.0).all() and (f_eff > 0.0).all():
            value = _cached_slot_model(slots, f_pre, f_eff, speed)
        else:
            value = slot_model(slots, f_pre, f_eff, speed)
        self._key, self._value = (slots, f_pre, f_eff, speed), value
        return value


def _cached_slot_model(slots: SlotTables, f_pre: np.ndarray, f_eff: np.ndarray,
                       speed: np.ndarray | None) -> SlotModel:
    sp = slots.prof
    # profiles.clock_slowdown over every slot: phi * (f_max / f) + (1 - phi).
    sd_pre = sp.prefill_phi * (sp.max_freq_mhz / f_pre) + (1.0 - sp.prefill_phi)
    sd_dec = sp.decode_phi * (sp.max_freq_mhz / f_eff) + (1.0 - sp.decode_phi)
    p0, p1, p2 = sp.prefill_p0_s, sp.prefill_p1_s_per_token, sp.prefill_p2_s_per_token2
    d0, d1, d2 = sp.decode_d0_s, sp.decode_d1_s_per_seq, sp.decode_d2_s_per_seq_token
    d3, moe_s = sp.decode_d3_s_per_expert, sp.decode_moe_experts_per_active
    any_moe = bool(np.count_nonzero(d3))

    def prefill(tok: np.ndarray, i: np.ndarray) -> np.ndarray:
        t = np.asarray(tok, dtype=np.float64)
        return (p0[i] + t * (p1[i] + p2[i] * t)) * sd_pre[i]

    def decode(b: np.ndarray, c: np.ndarray, i: np.ndarray) -> np.ndarray:
        b = np.asarray(b, dtype=np.float64)
        c = np.asarray(c, dtype=np.float64)
        base = d0[i] + b * (d1[i] + d2[i] * c)
        if any_moe:  # profiles.decode_iter_time_s's expert term, where a slot serves an MoE
            base = base + d3[i] * moe_experts_touched(b, moe_s[i])
        return base * sd_dec[i]

    if speed is None:
        return SlotModel(prefill, decode, slots.kv_tokens)
    return SlotModel(lambda tok, i: prefill(tok, i) / speed[i],
                     lambda b, c, i: decode(b, c, i) / speed[i], slots.kv_tokens)


def gpu_load(load: TickLoad, st: SlotSettings, slots: SlotTables, gpu_prefill_mhz: np.ndarray,
             vm_power_w: np.ndarray, dt: float) -> pw.GpuLoad:
    """Each GPU's phase mix and clocks over the tick, from the instance it belongs to.

    ``vm_power_w`` is each GPU's VM draw at full clock (0 on SaaS GPUs).
    """
    # Compiled (`power_kernels.gpu_phase_mix`): each GPU's share of its slot's prefill and
    # decode time, prompt tokens and decode load (`Profile.decode_power_load`).
    f64 = np.float64
    pre_frac, dec_frac, pre_tok, dec_load = pk.gpu_phase_mix(
        slots.gpu_o, slots.gpu_has_f, float(dt), np.asarray(load.prefill_busy_s, f64),
        np.asarray(load.decode_busy_s, f64), np.asarray(load.prefill_tokens, f64),
        np.asarray(load.decode_batch, f64), np.asarray(load.decode_ctx_tokens, f64),
        np.asarray(slots.prof.decode_power_ctx_per_ktok, f64))
    return pw.GpuLoad(
        prefill_frac=pre_frac,
        decode_frac=dec_frac,
        prefill_tokens=pre_tok,
        decode_batch=dec_load,
        freq_mhz=st.gpu_freq_mhz,
        prefill_freq_mhz=gpu_prefill_mhz,
        power_factor=st.power_factor,
        vm_power_w=vm_power_w,
        phase_power=slots.gpu_phase_power,
    )


def serial_slot_model(model: SlotModel, slots: SlotTables, f_eff: np.ndarray,
                      speed: np.ndarray | None) -> SlotModel:
    """``model`` with whole prefill passes, each at the clock its own prompt allows.

    For ``serving.prefill_mode: serial`` (one prompt per pass, `serving_request`): a pass of
    ``tokens`` prompt tokens runs at the slot's effective clock under the clock at which a pass of
    that length, drawing its serial share of the sustained power
    (`Profile.prefill_serial_power_ratio`), fits the GPU power limit (`_prefill_limit_mhz`), not
    at one clock set by the episode's mean prompt. With the ratio 1 that is the sustained cap of
    the real worker's profile recording (``envs/data/real/h100_llama3-8b_profile.json.gz``: up to
    512 tokens at 1,980 MHz, longer ones at 1,630-1,920 MHz); its served runs hold 1,950-1,965 MHz
    (median) through passes of more than 2,048 tokens. Decode timing is ``model``'s.
    """
    sp = slots.prof

    def prefill(tok: np.ndarray, i: np.ndarray) -> np.ndarray:
        t = np.asarray(tok, dtype=np.float64)
        f = np.minimum(f_eff[i], _prefill_limit_mhz(t, sp, i))
        s = prefill_time_s(t, f, sp.prefill_p0_s[i], sp.prefill_p1_s_per_token[i],
                           sp.prefill_p2_s_per_token2[i], sp.prefill_phi[i], sp.max_freq_mhz[i])
        return s if speed is None else s / speed[i]

    return SlotModel(prefill, model.decode_iter_time_s, model.kv_capacity_tokens)


def serial_prefill(load: TickLoad, slots: SlotTables, f_eff: np.ndarray, f_set: np.ndarray,
                   max_mhz: float) -> tuple[np.ndarray, np.ndarray]:
    """Each GPU's prefill clock and each slot's power-equivalent prompt over a tick of serial passes.

    For ``serving.prefill_mode: serial``: every pass of the tick (``load.prefill_passes``) runs at
    the clock at which a pass of its own prompt fits the GPU power limit (under the slot's
    effective and set clocks) and draws that prompt's power at that clock, capped at the limit.
    A slot's prefill power is the pass-time-weighted mean of its passes' draws, carried to the
    power model as the time-weighted mean clock and the prompt length whose draw at that clock
    equals the mean (``GpuLoad`` holds one prompt and one clock per GPU). Exact with no further
    clock ceiling in force (a row cap or thermal slowdown scales the mean by the ceiling); a
    pass of the tick's mean prompt instead overstates a mixed tick's power, the draw being
    concave in the prompt length and capped (Jensen).

    Returns:
        (per-GPU prefill clock, MHz, the maximum where no instance runs; per-slot prompt tokens
        for the power model, ``load.prefill_tokens`` where a slot ran no pass).
    """
    sp = slots.prof
    tokens_eq = load.prefill_tokens
    f_slot = np.minimum(f_eff, _prefill_limit_mhz(load.prefill_tokens, sp, np.arange(len(f_eff))))
    if load.prefill_passes is not None and len(load.prefill_passes[0]):
        slot, tok, sec = load.prefill_passes
        f = np.minimum(np.minimum(f_eff[slot], f_set[slot]), _prefill_limit_mhz(tok, sp, slot))
        idle = sp.idle_power_w[slot]
        draw = phase_power_w(tok, f, idle, sp.prefill_max_power_w[slot], sp.prefill_k_tokens[slot],
                             sp.power_freq_exponent[slot], sp.max_freq_mhz[slot],
                             sp.prefill_busy_power_w[slot])
        draw = serial_draw_w(idle, draw, sp.prefill_serial_power_ratio[slot])
        dyn = np.minimum(draw, sp.gpu_power_limit_w[slot]) - idle
        n = len(f_eff)
        w = np.bincount(slot, weights=sec, minlength=n)
        ran = w > 0
        w_safe = np.where(ran, w, 1.0)
        f_mean = np.bincount(slot, weights=sec * f, minlength=n) / w_safe
        dyn_mean = np.bincount(slot, weights=sec * dyn, minlength=n) / w_safe
        # The prompt whose draw at the mean clock (at max clock: divided by the clock factor) is
        # the mean draw; the saturating curve inverted: x = k u / (1 - u).
        at_max = dyn_mean / (f_mean / sp.max_freq_mhz) ** sp.power_freq_exponent
        span = np.maximum(sp.prefill_max_power_w - sp.idle_power_w - sp.prefill_busy_power_w, 1e-9)
        u = np.clip((at_max - sp.prefill_busy_power_w) / span, 1e-9, 1.0 - 1e-9)
        x = sp.prefill_k_tokens * u / (1.0 - u)
        tokens_eq = np.where(ran, x, load.prefill_tokens)
        f_slot = np.where(ran, f_mean, f_slot)
    o = slots.gpu_o
    gpu_mhz = np.where(slots.gpu_has, np.minimum(f_slot[o], f_set[o]), max_mhz)
    return gpu_mhz, tokens_eq


def _prefill_limit_mhz(tokens: np.ndarray, sp: ProfileArrays, i: np.ndarray) -> np.ndarray:
    """Clock at which a serial pass of ``tokens`` fits the GPU power limit.

    The pass draws `Profile.prefill_serial_power_ratio` of the sustained power above idle, so it
    fits where the sustained curve fits the headroom divided by that ratio
    (`Profile.serial_prefill_freq_at_limit_mhz` for one profile).
    """
    limit = serial_power_limit_w(sp.idle_power_w[i], sp.gpu_power_limit_w[i],
                                 sp.prefill_serial_power_ratio[i])
    return freq_at_power_limit_mhz(
        tokens, limit, sp.idle_power_w[i], sp.prefill_max_power_w[i],
        sp.prefill_k_tokens[i], sp.power_freq_exponent[i], sp.min_freq_mhz[i],
        sp.max_freq_mhz[i], sp.prefill_busy_power_w[i])
