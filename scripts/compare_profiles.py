"""`llm-cluster compare-profiles`: measured TP tables (``profile-tp``) vs the shipped profiles.

For every measured (model, GPU, TP) entry it evaluates the matching profile of
``envs/data/profiles`` (``envs/sim/profiles.py``) at the measured points and prints measured vs
model for prefill time (at the measured SM clock), decode iteration time (at the maximum
clock: decode runs below the power limit), and per-GPU power in the sustained phases (prefill
power capped at the GPU limit, as the simulator does), with the relative difference and the
MAPE per quantity.

With ``--write`` it refits, for each entry whose MAPE of a quantity exceeds ``--threshold-pct``,
that quantity's coefficients to the measurements (least squares; ``phi`` and the power-vs-clock
exponent are kept), replaces the quantity's grid by the measured one, records the fit error
and adds the measurement's provenance (command, date, GPU, driver). A measured TP with no
shipped profile gets a new file built from a profile of the same model and GPU (KV capacity
recomputed for the new TP with the same 90%-of-HBM assumption). Every written file is re-read
with the simulator's validator.

Usage::

    llm-cluster compare-profiles envs/data/real/h200_tp_llama2-70b.json
    llm-cluster compare-profiles table.json --as-gpu h100 --write --threshold-pct 10
"""

from __future__ import annotations

import copy
import json
import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tyro

from llm_cluster_gym.envs.sim.profiles import (
    DEFAULT_PROFILE_DIR,
    Profile,
    ProfileError,
    ProfileLibrary,
    load_profile,
)
from llm_cluster_gym.scripts.usage import UsageError

TABLE_SCHEMA = "llm-cluster-gym/tp-profile/1"
QUANTITIES = ("prefill_time", "decode_time", "prefill_power", "decode_power")


class CompareError(ValueError):
    """A measured table is malformed (names the file, field and value)."""


@dataclass
class CompareProfilesArgs:
    """Compare measured TP tables (from profile-tp) with the shipped profiles; refit with --write."""

    tables: tyro.conf.Positional[list[Path]]
    """Tables written by `llm-cluster profile-tp` (one or more)."""
    profile_dir: Path = DEFAULT_PROFILE_DIR
    """Folder of the simulator's profiles to compare against (and to write with --write)."""
    as_gpu: str | None = None
    """Compare against this GPU's profiles (default: the GPU each table entry was measured on)."""
    write: bool = False
    """Refit and write the profiles whose error exceeds --threshold-pct (new TPs get new files)."""
    threshold_pct: float = 10.0
    """Refit a quantity whose MAPE (%) exceeds this."""

    def __post_init__(self) -> None:
        if not self.tables:
            raise UsageError("give at least one table written by `llm-cluster profile-tp`")


def load_table(path: Path) -> dict[str, Any]:
    """Read and check a table written by ``profile_tp.py``."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"{path}: cannot read a TP table ({exc})") from exc
    if table.get("schema") != TABLE_SCHEMA:
        raise CompareError(f"{path}: field 'schema' must be {TABLE_SCHEMA!r}, got "
                           f"{table.get('schema')!r}")
    for i, e in enumerate(table.get("entries", [])):
        for key in ("model", "gpu", "tp", "prefill", "decode", "power"):
            if key not in e:
                raise CompareError(f"{path}: field 'entries[{i}].{key}' is missing")
        n = len(e["prefill"]["tokens"])
        if len(e["prefill"]["time_s"]) != n or len(e["decode"]["time_s"]) != len(
                e["decode"]["batch"]):
            raise CompareError(f"{path}: field 'entries[{i}]' has grid columns of unequal length")
    return table


def _num(x: Any, default: float = math.nan) -> float:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else default


def measured_points(entry: dict[str, Any], max_freq_mhz: float) -> dict[str, dict[str, np.ndarray]]:
    """The entry's points per quantity as arrays (load, context, clock, measured value)."""
    pre = entry["prefill"]
    freq = np.array([_num(f, max_freq_mhz) for f in pre.get("sm_clock_mhz", [None] * len(
        pre["tokens"]))])
    dec = entry["decode"]
    phases = entry["power"].get("phases", [])

    def power(kind: str) -> dict[str, np.ndarray]:
        ph = [p for p in phases if p["kind"] == kind and _num(p.get("power_w_mean")) > 0]
        return {"load": np.array([p["load"] for p in ph], dtype=float),
                "freq": np.array([_num(p.get("sm_clock_mhz_median"), max_freq_mhz) for p in ph]),
                "value": np.array([p["power_w_mean"] for p in ph], dtype=float)}

    return {
        "prefill_time": {"load": np.array(pre["tokens"], float), "freq": freq,
                         "value": np.array(pre["time_s"], float)},
        "decode_time": {"load": np.array(dec["batch"], float),
                        "ctx": np.array(dec["ctx_tokens"], float),
                        "freq": np.full(len(dec["batch"]), max_freq_mhz),
                        "value": np.array(dec["time_s"], float)},
        "prefill_power": power("prefill"),
        "decode_power": power("decode"),
    }


def predict(p: Profile, q: str, pts: dict[str, np.ndarray]) -> np.ndarray:
    """What profile ``p`` says for quantity ``q`` at the measured points."""
    if q == "prefill_time":
        return p.prefill_time_s(pts["load"], pts["freq"])
    if q == "decode_time":
        return p.decode_iter_time_s(pts["load"], pts["ctx"], pts["freq"])
    if q == "prefill_power":
        return np.minimum(p.prefill_power_w(pts["load"], pts["freq"]), p.gpu_power_limit_w)
    return np.minimum(p.decode_power_w(pts["load"], pts["freq"]), p.gpu_power_limit_w)


def _err(measured: np.ndarray, model: np.ndarray) -> dict[str, float]:
    if measured.size == 0:
        return {"mape_pct": math.nan, "max_abs_pct": math.nan, "n": 0}
    rel = (model - measured) / measured * 100.0
    return {"mape_pct": float(np.mean(np.abs(rel))), "max_abs_pct": float(np.max(np.abs(rel))),
            "n": int(measured.size)}


def compare_entry(p: Profile, entry: dict[str, Any]) -> dict[str, Any]:
    """Per-quantity points and errors of profile ``p`` against one measured entry."""
    pts = measured_points(entry, p.max_freq_mhz)
    out: dict[str, Any] = {}
    for q in QUANTITIES:
        model = predict(p, q, pts[q]) if pts[q]["value"].size else np.zeros(0)
        out[q] = {"points": pts[q], "model": model, **_err(pts[q]["value"], model)}
    idle = _num(entry["power"].get("idle_w_per_gpu"))
    out["idle_power"] = {"measured": idle, "model": p.idle_power_w}
    return out


def format_comparison(key: str, cmp: dict[str, Any]) -> str:
    """Human-readable table of one comparison."""
    lines = [f"== {key}"]
    units = {"prefill_time": ("tokens", "ms", 1e3), "decode_time": ("batch", "ms", 1e3),
             "prefill_power": ("tokens", "W", 1.0), "decode_power": ("batch", "W", 1.0)}
    for q in QUANTITIES:
        c = cmp[q]
        lab, unit, k = units[q]
        if not c["n"]:
            lines.append(f"  {q}: no measured points")
            continue
        lines.append(f"  {q}: MAPE {c['mape_pct']:.1f}%  max {c['max_abs_pct']:.1f}%  "
                     f"(n={c['n']})")
        pts = c["points"]
        for i in range(c["n"]):
            ctx = f" ctx={pts['ctx'][i]:.0f}" if "ctx" in pts else ""
            m, s = pts["value"][i] * k, c["model"][i] * k
            lines.append(f"    {lab}={pts['load'][i]:.0f}{ctx} clock={pts['freq'][i]:.0f} MHz: "
                         f"measured {m:.3f} {unit}, sim {s:.3f} {unit} "
                         f"({(s - m) / m * 100:+.1f}%)")
    idle = cmp["idle_power"]
    lines.append(f"  idle power: measured {idle['measured']:.1f} W, sim {idle['model']:.1f} W")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Refitting
# ---------------------------------------------------------------------------------------------


def nonneg_lstsq(a: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> np.ndarray:
    """Least squares with coefficients >= 0: drop the most negative term and refit (small n)."""
    w = np.ones_like(y) if weight is None else weight
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol = np.linalg.lstsq(a[:, active] * w[:, None], y * w, rcond=None)[0]
        if np.all(sol >= 0):
            coef[:] = 0.0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))
    return coef


def fit_saturating_power(load: np.ndarray, freq: np.ndarray, power: np.ndarray, idle_w: float,
                         gamma: float, max_freq_mhz: float, k_grid: np.ndarray
                         ) -> tuple[float, float]:
    """(max_power_w, k) of ``idle + (max-idle) * x/(x+k) * (f/fmax)**gamma`` (grid over k)."""
    best = (math.inf, math.nan, math.nan)
    for k in k_grid:
        basis = load / (load + k) * (freq / max_freq_mhz) ** gamma
        span = float(basis @ (power - idle_w) / max(basis @ basis, 1e-12))
        if span <= 0:
            continue
        err = float(np.mean(((idle_w + span * basis) - power) ** 2 / power ** 2))
        if err < best[0]:
            best = (err, idle_w + span, float(k))
    return best[1], best[2]


def refit_profile(data: dict[str, Any], p: Profile, entry: dict[str, Any], quantities: list[str],
                  provenance: dict[str, Any]) -> dict[str, Any]:
    """A copy of profile JSON ``data`` with ``quantities`` refitted to the measured ``entry``."""
    d = copy.deepcopy(data)
    c = d["coefficients"]
    pts = measured_points(entry, p.max_freq_mhz)
    phi_p, fmax = p.prefill_phi, p.max_freq_mhz
    idle = _num(entry["power"].get("idle_w_per_gpu"), p.idle_power_w)
    done: list[str] = []
    src = (f"measured here: {provenance.get('command')} ({provenance.get('date_utc')}, "
           f"{provenance.get('gpu_name')}, driver {provenance.get('driver')})")
    if "prefill_time" in quantities:
        x = pts["prefill_time"]
        at_max = x["value"] / (phi_p * fmax / x["freq"] + 1 - phi_p)
        coef = nonneg_lstsq(np.stack([np.ones_like(x["load"]), x["load"], x["load"] ** 2], 1),
                            at_max, 1.0 / at_max)
        c.update(prefill_p0_s=coef[0], prefill_p1_s_per_token=coef[1],
                 prefill_p2_s_per_token2=coef[2])
        d["grids"]["prefill"] = {
            "tokens": x["load"].tolist(), "time_s_measured": x["value"].tolist(),
            "freq_mhz": x["freq"].tolist(), "time_s_at_max_freq": at_max.tolist(),
            "note": f"{src}; time_s_at_max_freq = measured / (phi*fmax/freq + 1 - phi)"}
        done.append("prefill_time")
    if "decode_time" in quantities:
        x = pts["decode_time"]
        coef = nonneg_lstsq(np.stack([np.ones_like(x["load"]), x["load"], x["load"] * x["ctx"]],
                                     1), x["value"], 1.0 / x["value"])
        c.update(decode_d0_s=coef[0], decode_d1_s_per_seq=coef[1],
                 decode_d2_s_per_seq_token=coef[2])
        d["grids"]["decode"] = {"batch": x["load"].tolist(), "ctx_tokens": x["ctx"].tolist(),
                                "time_s": x["value"].tolist(), "note": src}
        done.append("decode_time")
    for q, kmax, kkey, pkey in (("prefill_power", 1e5, "prefill_k_tokens", "prefill_max_power_w"),
                                ("decode_power", 1e3, "decode_k_batch", "decode_max_power_w")):
        x = pts[q]
        if q not in quantities or x["value"].size < 2:
            continue
        pmax, k = fit_saturating_power(x["load"], x["freq"], x["value"], idle,
                                       p.power_freq_exponent, fmax,
                                       np.geomspace(kmax * 1e-4, kmax, 400))
        if math.isfinite(pmax):
            c.update({pkey: pmax, kkey: k, "idle_power_w": idle})
            cols = {"tokens" if q == "prefill_power" else "batch": x["load"].tolist(),
                    "power_w": x["value"].tolist(), "note": src}
            if q == "prefill_power":
                cols["freq_mhz"] = x["freq"].tolist()
            d["grids"][q] = cols
            done.append(q)
    newp = _profile_of(d)
    for q in done:
        e = _err(pts[q]["value"], predict(newp, q, pts[q]))
        d["fit_error"][q] = {**e, "target": f"measured {q} ({src})"}
    d["provenance"].setdefault("sources", []).append(
        {"measured_here": provenance, "used_for": f"refit of {', '.join(done)} (TP{p.tp})"})
    d["provenance"]["updated_by"] = shlex.join([sys.executable, *sys.argv])
    d["provenance"]["updated_on"] = datetime.now(timezone.utc).date().isoformat()
    return d


def _profile_of(d: dict[str, Any]) -> Profile:
    from llm_cluster_gym.envs.sim.profiles import profile_from_dict

    return profile_from_dict(d, Path(f"{d['model']}_{d['gpu']}_tp{d['tp']}.json"))


def new_profile_from_template(template: dict[str, Any], tp: int) -> dict[str, Any]:
    """A profile JSON for a TP with no shipped file, from a same-model, same-GPU template."""
    d = copy.deepcopy(template)
    d["tp"] = int(tp)
    mem = d["hardware"]["memory_bytes_per_gpu"]
    w = d["model_shape"]["weights_bytes_bf16"]
    kvb = d["model_shape"]["kv_bytes_per_token"]
    kv = math.floor((0.9 * tp * mem - w) / kvb)
    if kv <= 0:
        raise CompareError(f"new profile {d['model']}/{d['gpu']}/tp{tp}: weights {w} B do not fit "
                           f"in 90% of {tp} x {mem} B")
    d["coefficients"]["kv_capacity_tokens"] = kv
    d.setdefault("derivations", {})["kv_capacity"] = {
        "arithmetic": f"floor((0.9 * {tp} GPUs * {mem} B - {w} B weights) / {kvb} B per token) "
                      f"= {kv}",
        "note": "MODELLING ASSUMPTION: 90% of HBM usable (as the other profiles); file made by "
                f"compare_profiles.py from the TP{template['tp']} profile",
    }
    return d


def run(ns: CompareProfilesArgs, command: str = "llm-cluster compare-profiles") -> int:
    """Print the comparison; with --write, update or create profile files.

    Raises:
        ProfileError: The profile folder is unreadable.
        CompareError: A table is malformed (both before anything is compared).
    """
    lib = ProfileLibrary.load(ns.profile_dir)
    tables = [load_table(t) for t in ns.tables]
    summary = []
    for table in tables:
        prov = table.get("provenance", {})
        for e in table["entries"]:
            gpu = ns.as_gpu or e["gpu"]
            key = f"{e['model']}/{gpu}/tp{e['tp']}"
            path = ns.profile_dir / f"{e['model']}_{gpu}_tp{e['tp']}.json"
            try:
                p = lib.get(e["model"], gpu, e["tp"])
                data = json.loads((ns.profile_dir / p.source).read_text())
            except ProfileError:
                tps = lib.tps(e["model"], gpu)
                if not tps:
                    print(f"== {key}: no shipped profile of {e['model']} on {gpu}; skipped")
                    continue
                near = min(tps, key=lambda t: abs(math.log2(t / e["tp"])))
                tpl = lib.get(e["model"], gpu, near)
                data = new_profile_from_template(
                    json.loads((ns.profile_dir / tpl.source).read_text()), e["tp"])
                p = _profile_of(data)
                print(f"== {key}: no shipped profile; comparing with a new one from TP{near}")
            cmp = compare_entry(p, e)
            print(format_comparison(key, cmp))
            bad = [q for q in QUANTITIES if cmp[q]["n"] and cmp[q]["mape_pct"] > ns.threshold_pct]
            summary.append({"profile": key, **{q: cmp[q]["mape_pct"] if cmp[q]["n"] else None
                                               for q in QUANTITIES},
                            "refit": bad})
            if ns.write and bad:
                new = refit_profile(data, p, e, bad, prov)
                path.write_text(json.dumps(new, indent=1) + "\n")
                load_profile(path)  # the simulator's validator
                print(f"  wrote {path} (refitted: {', '.join(bad)})")
    print(json.dumps(summary))
    return 0
