"""Index arrays that place every GPU in its server, rack, row (power) and aisle (cooling).

Aggregation up the hierarchy is then one `np.bincount` per level, with no Python loops. The topology
also holds each GPU's fixed air-temperature offset above its aisle's inlet (`gpu_inlet_offset_c`):
the rack's place along its row (recirculation grows away from the cooling unit) plus the GPU's place
in its server's airflow. Both are opt-in scenario fields; with neither, every GPU sees its aisle's
inlet exactly, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_cluster_gym.envs.sim.scenario import Scenario


@dataclass(frozen=True)
class Topology:
    """Static datacenter layout and its provisioned limits.

    Attributes:
        server_row, server_aisle, server_rack: Domain index of each server.
        server_is_saas: Server hosts SaaS LLM instances (else it is an IaaS VM host).
        gpu_server: Server of each GPU.
        row_limit_w: Provisioned power of each row (servers' peak / power oversubscription).
        aisle_capacity_w: Heat-removal capacity of each aisle (servers' peak / cooling oversubscription).
        gpu_inlet_offset_c: Each GPU's air temperature above its aisle's inlet (C): rack position
            along the row plus GPU position in the server; None when every offset is zero.
    """

    n_rows: int
    n_aisles: int
    n_servers: int
    gpus_per_server: int
    server_row: np.ndarray
    server_aisle: np.ndarray
    server_rack: np.ndarray
    server_is_saas: np.ndarray
    gpu_server: np.ndarray
    gpu_row: np.ndarray
    gpu_aisle: np.ndarray
    row_limit_w: np.ndarray
    aisle_capacity_w: np.ndarray
    saas_servers: np.ndarray
    gpu_inlet_offset_c: np.ndarray | None = None

    @property
    def n_gpus(self) -> int:
        """GPUs in the datacenter."""
        return self.n_servers * self.gpus_per_server

    def row_sum(self, per_server: np.ndarray) -> np.ndarray:
        """Sum a per-server quantity over each row."""
        return np.bincount(self.server_row, weights=per_server, minlength=self.n_rows)

    def aisle_sum(self, per_server: np.ndarray) -> np.ndarray:
        """Sum a per-server quantity over each aisle."""
        return np.bincount(self.server_aisle, weights=per_server, minlength=self.n_aisles)

    def gpu_inlet_c(self, aisle_inlet_c: np.ndarray) -> np.ndarray:
        """The air temperature at each GPU (C): its aisle's inlet plus its fixed position offset."""
        inlet = aisle_inlet_c[self.gpu_aisle]
        if self.gpu_inlet_offset_c is not None:
            inlet += self.gpu_inlet_offset_c
        return inlet


def gpu_inlet_offsets_c(scenario: Scenario, server_rack: np.ndarray) -> np.ndarray | None:
    """Each GPU's fixed air-temperature offset above its aisle's inlet (C), or None if all are zero.

    Rack part: `cooling.rack_inlet_spread_c` x (rack's index in its row) / (racks per row - 1), so
    the first rack of a row (next to the cooling unit) sits at the aisle's inlet and the last at
    inlet + spread. GPU part: `server.gpu_inlet_offsets_c[k]` for the k-th GPU of every server.
    """
    d = scenario.datacenter
    spread_c, by_gpu = d.cooling.rack_inlet_spread_c, d.server.gpu_inlet_offsets_c
    if spread_c == 0 and not any(by_gpu):
        return None
    g = d.server.gpus
    rack_in_row = server_rack % d.racks_per_row
    rack_c = spread_c * rack_in_row / max(d.racks_per_row - 1, 1)
    offset = np.repeat(rack_c, g)
    if by_gpu:
        offset += np.tile(np.asarray(by_gpu, dtype=float), len(server_rack))
    offset.flags.writeable = False
    return offset


def provisioned_server_peak_w(scenario: Scenario) -> float:
    """One server's power that the oversubscriptions divide (W): nameplate or measured full load."""
    d = scenario.datacenter
    if d.oversubscription_basis == "measured_peak":
        return d.server.gpus * d.server.gpu_tdp_w + d.server.overhead_max_w
    return d.server.max_power_w


def build_topology(scenario: Scenario) -> Topology:
    """Lay out rows, racks, servers and GPUs; mark SaaS servers spread evenly across rows."""
    d = scenario.datacenter
    servers_per_row = d.racks_per_row * d.servers_per_rack
    n_servers = d.rows * servers_per_row
    server_row = np.repeat(np.arange(d.rows), servers_per_row)
    server_rack = np.repeat(np.arange(d.rows * d.racks_per_row), d.servers_per_rack)
    server_aisle = server_row // d.rows_per_aisle
    n_aisles = int(server_aisle.max()) + 1
    # SaaS servers interleave across rows (position-major order), so each row hosts a share.
    order = np.lexsort((server_row, np.tile(np.arange(servers_per_row), d.rows)))
    n_saas = round(n_servers * d.saas_fraction)
    is_saas = np.zeros(n_servers, dtype=bool)
    is_saas[order[:n_saas]] = True
    saas_servers = order[:n_saas]
    g = d.server.gpus
    gpu_server = np.repeat(np.arange(n_servers), g)
    peak_server_w = provisioned_server_peak_w(scenario)
    row_limit_w = np.full(d.rows, servers_per_row * peak_server_w / d.power_oversubscription)
    aisle_servers = np.bincount(server_aisle, minlength=n_aisles)
    aisle_capacity_w = aisle_servers * peak_server_w / d.cooling_oversubscription
    return Topology(
        n_rows=d.rows,
        n_aisles=n_aisles,
        n_servers=n_servers,
        gpus_per_server=g,
        server_row=server_row,
        server_aisle=server_aisle,
        server_rack=server_rack,
        server_is_saas=is_saas,
        gpu_server=gpu_server,
        gpu_row=server_row[gpu_server],
        gpu_aisle=server_aisle[gpu_server],
        row_limit_w=row_limit_w,
        aisle_capacity_w=aisle_capacity_w.astype(float),
        saas_servers=saas_servers,
        gpu_inlet_offset_c=gpu_inlet_offsets_c(scenario, server_rack),
    )
