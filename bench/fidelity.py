"""Sim-to-real fidelity from the committed H100 recordings (CPU only, about a minute).

Fits the node's coefficients of the shape-based model (``envs/perf``: the model the datacenter
simulator derives its profiles from) to ``envs/data/real/h100_calibration_run.json.gz`` (one Azure
conversation-trace window served by the real worker on an H100) and the sustained phases of
``envs/data/real/h100_llama3-8b_profile.json.gz`` with the shape model's calibration routine
(``envs/real/node_calibration.py``), derives the node's simulator profile from it, fits the
thermal model to the profile recording, then replays the requests of
``envs/data/real/h100_fidelity_run.json.gz`` (another window, with a batch-cap drill) in
``SimCluster`` and prints power MAPE (1 s windows), temperature RMSE and throughput error (total
generated tokens), and the replay's latency against the real run's: TTFT and TBT at P50 and P90,
each with its own relative error (both sides read from the same latency bins).
Goals of issue 7: power MAPE <= 0.05, temperature RMSE <= 2 C, throughput error <= 0.10.
It also judges the same fit on runs recorded on two other H100s (``h100_other_gpu_*.json.gz``).
"""

from __future__ import annotations

import json

from llm_cluster_gym.envs.real.fidelity import calibrate_and_compare
from llm_cluster_gym.scripts.calibrate import CALIBRATION_REC, FIDELITY_REC, OTHER_GPU_RECS, PROFILE_REC


def main() -> None:
    rep = calibrate_and_compare(PROFILE_REC, FIDELITY_REC, CALIBRATION_REC,
                                other_runs=OTHER_GPU_RECS)
    s = rep["summary"]
    print(json.dumps({k: v for k, v in s.items() if k not in ("power_mape", "temp_rmse_c",
                                                              "throughput_error")}, indent=1))
    for path in OTHER_GPU_RECS:
        t = s["other_runs"][path.name]
        print(f"on another H100 ({path.name}, same fit): power MAPE {t['power_mape']:.3f}, "
              f"temperature RMSE {t['temp_rmse_c']:.2f} C, throughput error "
              f"{t['throughput_error']:.4f}, energy error {t['energy_error']:.3f}, TTFT P50 "
              f"error {t['ttft_p50_error']:.3f}, TBT P50 error {t['tbt_p50_error']:.3f}")
    lat = s["latency"]
    for name in ("ttft", "tbt"):
        print(f"{name.upper()} held-out: real P50 {lat[f'real_{name}_p50_binned_s']:.4f} s, "
              f"replay {lat[f'sim_{name}_p50_s']:.4f} s (error {lat[f'{name}_p50_error']:.3f}); "
              f"P90 {lat[f'real_{name}_p90_binned_s']:.4f} s vs {lat[f'sim_{name}_p90_s']:.4f} s "
              f"(error {lat[f'{name}_p90_error']:.3f})")
    print(json.dumps({"power_mape": s["power_mape"], "temp_rmse_c": s["temp_rmse_c"],
                      "throughput_error": s["throughput_error"],
                      "ttft_p50_error": lat["ttft_p50_error"], "tbt_p50_error": lat["tbt_p50_error"],
                      "ttft_p90_error": lat["ttft_p90_error"], "tbt_p90_error": lat["tbt_p90_error"]}))


if __name__ == "__main__":
    main()
