"""How the worker launches its model passes: bucketed, as replayed CUDA graphs or eagerly.

An eager pass of the 8B model is Python-launch bound, so on CUDA each (batch bucket,
chunk-count bucket) decode iteration and each prompt-length bucket of prefill (up to
``prefill_graph_max_tokens``) is captured once as a CUDA graph and replayed; the graphs read
their inputs from the fixed buffers of :class:`~llm_cluster_gym.envs.real.llama.LlamaPasses`.
:class:`GraphedPasses` picks the bucket, fills the buffers, captures on first use (or all at
once in :meth:`GraphedPasses.warmup`) and replays; without graphs it runs the same passes
eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from llm_cluster_gym.envs.real.llama import LlamaPasses
from llm_cluster_gym.envs.real.worker_config import WorkerConfig


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two >= ``n``, and at least ``lo``."""
    return max(lo, 1 << max(0, int(n - 1).bit_length()))


def chunk_buckets(max_chunks: int) -> list[int]:
    """Chunk-count buckets of the chunked decode graphs: steps of 8 to 64, 32 to 256, then 64."""
    out = [n for n in range(8, 65, 8)] + list(range(96, 257, 32)) + list(range(320, 100000, 64))
    out = [n for n in out if n < max_chunks]
    return [*out, max_chunks]


def prefill_buckets(max_tokens: int) -> list[int]:
    """Prompt-length buckets of the prefill graphs (at most ~25 % padding above 128 tokens)."""
    out = [32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048,
           2560, 3072, 3584, 4096]
    return [n for n in out if n <= max_tokens]


class GraphedPasses:
    """The prefill and decode passes of a :class:`LlamaPasses`, replayed from CUDA graphs.

    Args:
        passes: The model, its KV cache and input buffers.
        config: ``cuda_graphs``, ``prefill_graphs`` and ``prefill_graph_max_tokens`` (None:
            graphs on CUDA only).
    """

    def __init__(self, passes: LlamaPasses, config: WorkerConfig) -> None:
        torch = passes.torch
        self.torch = torch
        self.passes = passes
        self.device = passes.device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if config.cuda_graphs is None else bool(config.cuda_graphs)
        self.nc_buckets = chunk_buckets(passes.max_chunks)
        self.use_prefill_graphs = cuda if config.prefill_graphs is None \
            else bool(config.prefill_graphs)
        self.pre_buckets = prefill_buckets(min(int(config.prefill_graph_max_tokens),
                                               passes.max_ctx))
        nb = max(self.pre_buckets, default=1)
        # Fixed inputs of the prefill graphs: the padded prompt, its slot, its last position.
        self._pre_ids = torch.zeros(nb, dtype=torch.long, device=self.device)
        self._pre_slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pre_last = torch.zeros(1, dtype=torch.long, device=self.device)
        self._pre_graphs: dict[int, tuple[Any, Any]] = {}
        self._graphs: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def sync(self) -> None:
        """Wait for the device (makes wall-clock timestamps mean "done")."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def _capture(self, run: Callable[[], Any]) -> tuple[Any, Any]:
        """Capture ``run`` (after two warm-up runs on a side stream) as a graph and its output.

        The warm-up writes the same K/V the replay will write (same inputs), so it is harmless.
        """
        torch = self.torch
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = run()
        return graph, out

    def release(self) -> int:
        """Destroy every captured graph; returns how many (later passes capture again).

        A graph that holds NCCL collectives keeps its communicator in use, and
        ``destroy_process_group`` then waits for it forever (pytorch/pytorch#115388), so a
        tensor-parallel rank releases its graphs before it leaves the group.
        """
        graphs = [g for g, _ in (*self._graphs.values(), *self._pre_graphs.values())]
        self._graphs.clear()
        self._pre_graphs.clear()
        if graphs:
            self.sync()
            for g in graphs:
                g.reset()
            self.sync()
        return len(graphs)

    # ------------------------------------------------------------------ prefill
    def prefill(self, tokens: Any, slot: int) -> Any:
        """Run one prompt through the model into KV slot ``slot``; returns the next token id.

        With prefill graphs the prompt is padded at its end to a length bucket and the pass
        replays a captured CUDA graph (causal attention keeps the padding out of the real
        tokens; the padding's K/V land past the prompt, where decode overwrites them before
        any read). Longer prompts, or no graphs, run eagerly at their exact length.
        """
        torch = self.torch
        n = int(tokens.shape[0])
        nb = next((b for b in self.pre_buckets if b >= n), None) if self.use_prefill_graphs \
            else None
        if nb is None:
            slot_t = torch.full((1,), int(slot), dtype=torch.long, device=self.device)
            last_t = torch.full((1,), n - 1, dtype=torch.long, device=self.device)
            return self.passes.prefill_pass(tokens, slot_t, last_t)[0]
        self._pre_ids[:n].copy_(tokens)
        self._pre_slot.fill_(int(slot))
        self._pre_last.fill_(n - 1)
        if nb not in self._pre_graphs:
            self._capture_prefill(nb)
        graph, out = self._pre_graphs[nb]
        graph.replay()
        return out[0]

    def _capture_prefill(self, nb: int) -> None:
        ids, slot_t, last_t = self._pre_ids[:nb], self._pre_slot, self._pre_last
        self._pre_graphs[nb] = self._capture(lambda: self.passes.prefill_pass(ids, slot_t, last_t))

    # ------------------------------------------------------------------ decode
    def decode_buckets(self, n: int, max_pos: int, n_chunks: int | None = None
                       ) -> tuple[int, int]:
        """(batch bucket, context bucket or chunk-row bucket) a decode of ``n`` sequences uses."""
        p = self.passes
        b = min(pow2_at_least(n, 1), p.max_slots)
        if p.chunked:
            if n_chunks is None:
                n_chunks = n * (max_pos // p.chunk + 1)
            return b, next(x for x in self.nc_buckets if x >= n_chunks)
        c = min(pow2_at_least(max_pos + 1, 128), p.max_ctx)
        return b, c

    def decode_step(self, n: int, max_pos: int | None = None, positions: Any = None) -> None:
        """Run one decode iteration for slots ``0..n-1`` (inputs already in the buffers).

        Args:
            n: Running sequences (slots ``0..n-1``).
            max_pos: Largest cache position written (padded attention); derived if None.
            positions: Host copy of ``passes.pos[:n]`` (read from the device if None).
        """
        torch, p = self.torch, self.passes
        if positions is None and (p.chunked or max_pos is None):
            positions = p.pos[:n].cpu().numpy()
        if max_pos is None:
            max_pos = int(np.max(positions))
        n_chunks = None
        if p.chunked:
            table = p.chunk_table(positions)
            n_chunks = table.shape[1]
        b, c = self.decode_buckets(n, max_pos, n_chunks)
        with torch.inference_mode():
            if p.chunked:
                pad = np.zeros((3, c - n_chunks), dtype=np.int64)
                p.ch_meta[:, :c].copy_(torch.from_numpy(np.concatenate([table, pad], 1)))
            if not self.use_graphs:
                out = p.decode_pass(b, c)
            else:
                key = (b, c)
                if key not in self._graphs:
                    self._capture_decode(b, c)
                graph, out = self._graphs[key]
                graph.replay()
            p.tok[:n].copy_(out[:n])
            p.pos[:n] += 1

    def _capture_decode(self, b: int, c: int) -> None:
        self._graphs[(b, c)] = self._capture(lambda: self.passes.decode_pass(b, c))

    def _decode_keys(self) -> list[tuple[int, int]]:
        """Every (batch bucket, context or chunk-row bucket) serving can reach."""
        p = self.passes
        b = 1
        batches = []
        while b < p.max_slots:
            batches.append(b)
            b *= 2
        batches.append(p.max_slots)
        keys: list[tuple[int, int]] = []
        if p.chunked:
            def bucket(rows: int) -> int:
                return next(x for x in self.nc_buckets if x >= rows)

            for i, bb in enumerate(batches):
                lo = batches[i - 1] + 1 if i else 1  # fewest sequences that use this bucket
                keys += [(bb, x) for x in self.nc_buckets
                         if bucket(lo) <= x <= bucket(bb * p.chunks_per_slot)]
        else:
            c = 128
            ctxs = []
            while c < p.max_ctx:
                ctxs.append(c)
                c *= 2
            ctxs.append(p.max_ctx)
            keys = [(bb, cc) for bb in batches for cc in ctxs]
        return keys

    def warmup(self) -> int:
        """Capture every decode bucket and prefill bucket now, so serving never pauses for it.

        Returns:
            Number of graphs captured (0 without CUDA graphs).
        """
        p = self.passes
        n = 0
        if self.use_prefill_graphs:
            with self.torch.inference_mode():
                for nb in self.pre_buckets:
                    if nb not in self._pre_graphs:
                        self._pre_slot.zero_()
                        self._pre_last.fill_(nb - 1)
                        self._capture_prefill(nb)
                        n += 1
        if not self.use_graphs:
            self.sync()
            return n
        keys = self._decode_keys()
        with self.torch.inference_mode():
            for key in keys:
                if key not in self._graphs:
                    p.pos[: key[0]] = 0
                    p.ch_meta.zero_()
                    self._capture_decode(*key)
                    n += 1
        p.pos.zero_()
        self.sync()
        return n
