from pathlib import Path

import pytest

from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario, shipped_scenarios
from llm_cluster_gym.envs.sim.topology import build_topology


@pytest.mark.parametrize("name", shipped_scenarios())
def test_shipped_scenarios_load(name):
    s = load_scenario(name)
    topo = build_topology(s)
    assert topo.n_gpus == s.n_gpus
    sv = s.datacenter.server
    peak_w = (sv.max_power_w if s.datacenter.oversubscription_basis == "nameplate"
              else sv.gpus * sv.gpu_tdp_w + sv.overhead_max_w)
    assert topo.row_limit_w.sum() * s.datacenter.power_oversubscription == pytest.approx(
        s.n_servers * peak_w)
    assert topo.aisle_capacity_w.sum() * s.datacenter.cooling_oversubscription == pytest.approx(
        s.n_servers * peak_w)


def test_oversubscription_against_measured_peak(tmp_path):
    """`measured_peak` divides the DGX's measured full-load draw (8 x 700 + 2,780 W), not 10.2 kW."""
    p = _write(tmp_path, "")
    text = p.read_text().replace("datacenter:\n", "datacenter:\n  oversubscription_basis: measured_peak\n", 1)
    p.write_text(text)
    measured = build_topology(load_scenario(p))
    nameplate = build_topology(load_scenario("small"))
    small = load_scenario("small")
    per_row = small.datacenter.racks_per_row * small.datacenter.servers_per_rack
    assert measured.row_limit_w[0] == pytest.approx(
        per_row * 8380.0 / small.datacenter.power_oversubscription)
    assert measured.row_limit_w[0] / nameplate.row_limit_w[0] == pytest.approx(8380.0 / 10200.0)


def test_unknown_oversubscription_basis(tmp_path):
    p = _write(tmp_path, "")
    p.write_text(p.read_text().replace("datacenter:\n", "datacenter:\n  oversubscription_basis: rated\n", 1))
    with pytest.raises(ScenarioError, match=r"bad\.yaml.*oversubscription_basis.*rated"):
        load_scenario(p)


def test_sizes():
    assert load_scenario("medium").n_gpus == 1024
    assert load_scenario("large").n_gpus == 8192


def _write(tmp_path: Path, text: str) -> Path:
    base = (Path(__file__).parent.parent / "envs/scenarios/small.yaml").read_text()
    p = tmp_path / "bad.yaml"
    p.write_text(base + text)
    return p


def test_unknown_key_names_file_field_value(tmp_path):
    p = _write(tmp_path, "bogus_knob: 3\n")
    with pytest.raises(ScenarioError, match=r"bad\.yaml.*bogus_knob.*3"):
        load_scenario(p)


def test_negative_capacity(tmp_path):
    text = (Path(__file__).parent.parent / "envs/scenarios/small.yaml").read_text()
    p = tmp_path / "neg.yaml"
    p.write_text(text.replace("power_oversubscription: 1.0", "power_oversubscription: -1.0"))
    with pytest.raises(ScenarioError, match=r"neg\.yaml.*datacenter\.power_oversubscription.*-1"):
        load_scenario(p)


def test_inconsistent_topology(tmp_path):
    text = (Path(__file__).parent.parent / "envs/scenarios/small.yaml").read_text()
    p = tmp_path / "inc.yaml"
    p.write_text(text.replace("rows_per_aisle: 1", "rows_per_aisle: 5"))
    with pytest.raises(ScenarioError, match="rows_per_aisle"):
        load_scenario(p)
    p.write_text(text.replace("n_instances: 2, tp: 8", "n_instances: 20, tp: 8"))
    with pytest.raises(ScenarioError, match="asks for 176 GPUs"):
        load_scenario(p)


def test_wrong_type_and_fault_target(tmp_path):
    text = (Path(__file__).parent.parent / "envs/scenarios/small_faults.yaml").read_text()
    p = tmp_path / "f.yaml"
    p.write_text(text.replace("target: 1,", "target: 9,"))
    with pytest.raises(ScenarioError, match=r"faults\[1\]\.target.*9"):
        load_scenario(p)
    p.write_text(text.replace("duration_s: 600", "duration_s: soon"))
    with pytest.raises(ScenarioError, match="duration_s.*soon"):
        load_scenario(p)


def test_unknown_scenario_name():
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'"):
        load_scenario("nope")
