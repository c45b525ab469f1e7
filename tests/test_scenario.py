from pathlib import Path

import pytest

from llm_cluster_gym.envs.sim.scenario import ScenarioError, load_scenario, shipped_scenarios
from llm_cluster_gym.envs.sim.topology import build_topology


@pytest.mark.parametrize("name", shipped_scenarios())
def test_shipped_scenarios_load(name):
    s = load_scenario(name)
    topo = build_topology(s)
    assert topo.n_gpus == s.n_gpus
    assert topo.row_limit_w.sum() * s.datacenter.power_oversubscription == pytest.approx(
        s.n_servers * s.datacenter.server.max_power_w
    )


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
