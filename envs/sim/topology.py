"""Index arrays that place every GPU in its server, rack, row (power) and aisle (cooling).

Aggregation up the hierarchy is then one `np.bincount` per level, with no Python loops.
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
        row_limit_w: Provisioned power of each row (nameplate / power oversubscription).
        aisle_capacity_w: Heat-removal capacity of each aisle (nameplate / cooling oversubscription).
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
    nameplate_server_w = d.server.max_power_w
    row_limit_w = np.full(d.rows, servers_per_row * nameplate_server_w / d.power_oversubscription)
    aisle_servers = np.bincount(server_aisle, minlength=n_aisles)
    aisle_capacity_w = aisle_servers * nameplate_server_w / d.cooling_oversubscription
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
    )
