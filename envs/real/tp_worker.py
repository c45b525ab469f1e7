"""Tensor-parallel inference workers: one model over 2, 4 or 8 GPUs, one process per GPU.

Same interface as the single-GPU :class:`envs.real.worker.WorkerProcess` (``submit``,
``set_control``, ``pump``, ``poll``, ``close``), so :class:`envs.real.cluster.RealCluster` and the
controllers drive a :class:`TPWorkerProcess` unchanged (pass ``workers=build_tp_workers(...)``).

How it runs (the driver/worker split of Megatron-style serving engines):

* ``tp`` processes join one ``torch.distributed`` group: NCCL on GPUs (NVLink multicast, NVLS,
  forced off with ``NCCL_NVLS_ENABLE=0``), gloo on CPU (tests).
* Every rank holds its shard of the model (``envs/real/tp_layers.py``: heads, KV heads and MLP
  features split; two all-reduces per layer) and its shard of the static KV cache (its KV heads).
* Rank 0, the *leader*, runs the unchanged scheduler of :class:`InferenceEngine` (queue, batch
  cap, admission, continuous batching, TTFT/TBT bookkeeping). Each model pass it makes is first
  announced to the other ranks (the *followers*) with a small broadcast: the op and its
  arguments, plus the prompt token ids of a prefill or the token/position vectors of a decode.
  Followers only execute passes, so scheduling never diverges between ranks (wall-clock
  decisions such as dropping stale requests are taken once, on the leader).
* Decode iterations are captured as CUDA graphs on every rank (the all-reduces inside the
  graph), bucket by bucket in the same order on every rank.

Random weights do not depend on ``tp`` (see ``tp_layers``), so a TP2 model computes the same
function as the TP1 model of the same seed: tested on CPU.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from llm_cluster_gym.envs.real.tp_layers import (
    ShardSpec,
    TPShardError,
    init_random_sharded_,
    load_hf_weights_sharded_,
    make_row_parallel_,
)
from llm_cluster_gym.envs.real.worker import (
    SHAPES,
    InferenceEngine,
    ModelShape,
    PipeWorkerClient,
    WorkerConfig,
    WorkerError,
    serve_pipe,
    shape_from_hf_config,
)

__all__ = [
    "TP_SHAPES",
    "RankGroup",
    "TPInferenceEngine",
    "TPShardError",
    "TPWorkerConfig",
    "TPWorkerError",
    "TPWorkerProcess",
    "build_tp_workers",
    "reference_logits",
    "resolve_shape",
    "run_tp",
]


class TPWorkerError(WorkerError):
    """Bad tensor-parallel worker configuration or a rank that failed (names field and value)."""


TP_SHAPES: dict[str, ModelShape] = {
    **SHAPES,
    # meta-llama/Llama-2-70b-hf config.json (same numbers as model_shape in
    # envs/data/profiles/llama2-70b_h100_tp*.json).
    "llama2-70b": ModelShape("llama2-70b", 80, 8192, 64, 8, 128, 28672, 32000, 10000.0, 1e-5),
    # A two-layer model with 4 KV heads for CPU tests at TP 1/2/4 (not a real model).
    "tiny-tp": ModelShape("tiny-tp", 2, 64, 8, 4, 8, 128, 256, 10000.0, 1e-5),
}
"""Model shapes a TP worker can build with random weights (adds 70B-class and a test shape)."""

# Ops the leader announces (first int64 of the command tensor).
_OP_PREFILL, _OP_DECODE, _OP_MOVE, _OP_WARMUP, _OP_STOP = 1, 2, 3, 4, 5


def resolve_shape(config: WorkerConfig) -> ModelShape:
    """The full model shape a worker config names (HF config, or a key of :data:`TP_SHAPES`).

    Raises:
        WorkerError: Unknown model key or unreadable config.json.
    """
    if config.weights_path:
        return shape_from_hf_config(Path(config.weights_path) / "config.json")
    if config.model not in TP_SHAPES:
        raise TPWorkerError(f"WorkerConfig: field 'model' = {config.model!r} unknown; "
                            f"known: {sorted(TP_SHAPES)}")
    return TP_SHAPES[config.model]


@dataclass(frozen=True)
class TPWorkerConfig:
    """How to build one tensor-parallel worker.

    Attributes:
        worker: Engine settings (model, cache sizes, seed); its ``device`` picks the first GPU
            (``cuda:k`` gives ``cuda:k .. cuda:k+tp-1``) or ``cpu``.
        tp: Tensor-parallel degree: processes and GPUs.
        devices: Explicit devices, one per rank (overrides the ``worker.device`` rule).
        backend: ``"nccl"`` or ``"gloo"`` (None: NCCL on CUDA, gloo on CPU).
        master_port: TCP port of the rendezvous on 127.0.0.1 (None: a free one).
        start_timeout_s: Give up if the worker is not serving after this long.
        collective_timeout_s: Timeout of the process group (a dead rank fails the others).
        cpu_threads: Torch threads per rank on CPU (keeps tests from oversubscribing).
        start_method: ``"spawn"`` (as :class:`envs.real.worker.WorkerProcess`) or
            ``"forkserver"`` (ranks fork from a server that imported torch once: faster starts,
            used by the CPU tests). Never ``"fork"``: a forked CUDA context is unusable.
    """

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tp: int = 2
    devices: tuple[str, ...] | None = None
    backend: str | None = None
    master_port: int | None = None
    start_timeout_s: float = 900.0
    collective_timeout_s: float = 600.0
    cpu_threads: int = 1
    start_method: str = "spawn"

    def rank_devices(self) -> tuple[str, ...]:
        """Device of each rank."""
        if self.devices is not None:
            return tuple(self.devices)
        dev = self.worker.device
        if dev.startswith("cuda"):
            first = int(dev.split(":")[1]) if ":" in dev else 0
            return tuple(f"cuda:{first + r}" for r in range(self.tp))
        return (dev,) * self.tp

    def dist_backend(self) -> str:
        """The torch.distributed backend the ranks use."""
        if self.backend is not None:
            return self.backend
        return "nccl" if self.rank_devices()[0].startswith("cuda") else "gloo"

    def validate(self) -> ModelShape:
        """Check the config; returns the full model shape.

        Raises:
            TPWorkerError: Bad ``tp``, ``devices`` or ``backend``.
            TPShardError: The model does not split over ``tp``.
        """
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise TPWorkerError(f"TPWorkerConfig: field 'tp' must be an integer >= 1, got "
                                f"{self.tp!r}")
        devs = self.rank_devices()
        if len(devs) != self.tp:
            raise TPWorkerError(f"TPWorkerConfig: field 'devices' has {len(devs)} entries for "
                                f"tp={self.tp}: {devs}")
        if self.dist_backend() not in ("nccl", "gloo"):
            raise TPWorkerError(f"TPWorkerConfig: field 'backend' must be 'nccl' or 'gloo', got "
                                f"{self.backend!r}")
        if self.dist_backend() == "nccl" and len(set(devs)) != len(devs):
            raise TPWorkerError(f"TPWorkerConfig: field 'devices' repeats a GPU under NCCL: "
                                f"{devs}")
        if self.start_method not in ("spawn", "forkserver"):
            raise TPWorkerError(f"TPWorkerConfig: field 'start_method' must be 'spawn' or "
                                f"'forkserver', got {self.start_method!r}")
        shape = resolve_shape(self.worker)
        ShardSpec(shape, self.tp, 0)
        return shape


@dataclass(frozen=True)
class _ShardConfig(WorkerConfig):
    """A WorkerConfig whose ``shape()`` is one rank's local shape (what InferenceEngine builds)."""

    local_shape: ModelShape | None = None

    def shape(self) -> ModelShape:
        """The rank's local shape."""
        assert self.local_shape is not None
        return self.local_shape


# ---------------------------------------------------------------------------------------------
# The engine of one rank
# ---------------------------------------------------------------------------------------------


class TPInferenceEngine(InferenceEngine):
    """One rank's shard of a tensor-parallel engine.

    On the leader (rank 0) it is a full :class:`InferenceEngine`: ``submit``/``step``/
    ``set_control`` and the timing helpers work as on one GPU, and every model pass is
    announced to the followers. On a follower, call :meth:`serve_commands` and nothing else.

    Args:
        config: Engine settings; ``config.device`` is this rank's device.
        rank: This rank.
        tp: Tensor-parallel degree.
        group: The process group of the ranks (None when ``tp`` is 1).
        clock: Time source of the leader's scheduler.
    """

    def __init__(self, config: WorkerConfig, rank: int = 0, tp: int = 1, group: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        full = resolve_shape(config)
        spec = ShardSpec(full, tp, rank)
        t0 = time.perf_counter()
        # InferenceEngine builds the model, the KV cache and the graph buffers of the rank's
        # local shape (its heads, KV heads and MLP features); weights come next.
        InferenceEngine.__init__(
            self, _ShardConfig(**{**asdict(config), "weights_path": None}, local_shape=spec.local),
            clock)
        self.full_shape, self.spec = full, spec
        self.rank, self.tp, self.group = rank, tp, group
        self.is_leader = rank == 0
        if config.weights_path:
            load_hf_weights_sharded_(self.passes.model, Path(config.weights_path), spec)
        else:
            init_random_sharded_(self.passes.model, spec, config.seed)
        make_row_parallel_(self.passes.model, group if tp > 1 else None)
        self._stopped = False
        self._cmd = self.torch.zeros(4, dtype=self.torch.long, device=self.device)
        self.sync()
        self.build_s = time.perf_counter() - t0

    # ------------------------------------------------------------------ leader -> followers
    def _announce(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        if self.tp == 1:
            return
        if not self.is_leader:
            raise TPWorkerError(f"rank {self.rank}: only the leader (rank 0) schedules passes")
        cmd = self.torch.tensor([op, a, b, c], dtype=self.torch.long, device=self.device)
        self.torch.distributed.broadcast(cmd, src=0, group=self.group)

    def _bcast(self, tensor: Any) -> Any:
        self.torch.distributed.broadcast(tensor, src=0, group=self.group)
        return tensor

    def prefill(self, tokens: Any, slot: int) -> Any:
        """Announce, then run one prompt into KV slot ``slot`` (see InferenceEngine.prefill)."""
        if self.tp > 1:
            self._announce(_OP_PREFILL, int(tokens.shape[0]), int(slot))
            tokens = self._bcast(tokens.to(self.torch.long).contiguous())
        return InferenceEngine.prefill(self, tokens, slot)

    def decode_step(self, n: int, max_pos: int | None = None, positions: Any = None) -> None:
        """Announce (with the token and position vectors), then run one decode iteration."""
        if self.tp > 1:
            self._announce(_OP_DECODE, int(n), -1 if max_pos is None else int(max_pos))
            self._bcast(self.torch.stack([self.passes.tok[:n], self.passes.pos[:n]]).contiguous())
        InferenceEngine.decode_step(self, n, max_pos, positions)

    def _move_slot(self, src: int, dst: int) -> None:
        n = self.running[src].prompt_tokens + self.running[src].generated
        self._announce(_OP_MOVE, src, dst, n)
        self.passes.copy_slot(src, dst, n)

    def warmup(self) -> int:
        """Capture the decode CUDA graphs on every rank (same buckets, same order)."""
        self._announce(_OP_WARMUP)
        return InferenceEngine.warmup(self)

    def shutdown(self) -> None:
        """Release the followers from :meth:`serve_commands` (leader only; idempotent)."""
        if self.tp > 1 and self.is_leader and not self._stopped:
            self._stopped = True
            self._announce(_OP_STOP)
            self.sync()

    # ------------------------------------------------------------------ followers
    def serve_commands(self) -> int:
        """Follower loop: execute the leader's passes until it says stop.

        Returns:
            Number of commands executed.
        """
        torch = self.torch
        if self.is_leader:
            raise TPWorkerError("serve_commands: rank 0 is the leader; it schedules, not serves")
        n_cmd = 0
        while True:
            cmd = self._bcast(self._cmd)
            op, a, b, c = (int(v) for v in cmd.tolist())
            n_cmd += 1
            if op == _OP_STOP:
                return n_cmd
            with torch.inference_mode():
                if op == _OP_PREFILL:
                    ids = self._bcast(torch.empty(a, dtype=torch.long, device=self.device))
                    InferenceEngine.prefill(self, ids, b)
                elif op == _OP_DECODE:
                    st = self._bcast(torch.empty(2, a, dtype=torch.long, device=self.device))
                    self.passes.tok[:a] = st[0]
                    self.passes.pos[:a] = st[1]
                    InferenceEngine.decode_step(self, a, None if b < 0 else b)
                elif op == _OP_MOVE:
                    self.passes.copy_slot(a, b, c)
                elif op == _OP_WARMUP:
                    InferenceEngine.warmup(self)
                else:
                    raise TPWorkerError(f"rank {self.rank}: unknown op {op} from the leader")


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_STOPPED_KEY = "llm_cluster_gym/tp_stopped/"
# How long the leader waits for the followers to report that their group is gone.
_STOP_WAIT_S = 30.0


@dataclass
class RankGroup:
    """One rank's membership of the TP process group, and the rendezvous store it was made with.

    Rank 0 hosts the store (a ``TCPStore`` server). Every rank's NCCL group keeps polling that
    store (its heartbeat monitor) until the rank destroys the group, so the server must outlive
    the group of every other rank: otherwise the followers log c10d ``TCPStore`` "recvValue
    failed" warnings (seen on two H200s) at shutdown. :meth:`close` keeps that order: each rank
    destroys its group; a follower then tells rank 0 so through the store; rank 0 waits for all
    of them before it drops the store.
    """

    rank: int
    tp: int
    store: Any = None

    @classmethod
    def join(cls, backend: str, rank: int, tp: int, port: int, device: str | None,
             timeout_s: float) -> RankGroup:
        """Join (``tp`` > 1) the default process group of ``tp`` ranks over 127.0.0.1:``port``.

        Rank 0 hosts the store. NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``).

        Args:
            backend: ``"nccl"`` or ``"gloo"``.
            rank: This rank.
            tp: Number of ranks.
            port: Rendezvous port.
            device: This rank's CUDA device under NCCL (binds the communicator), else None.
            timeout_s: Rendezvous and collective timeout.
        """
        import torch
        import torch.distributed as dist

        os.environ["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off on the lent machines
        rg = cls(rank, tp)
        if tp > 1:
            kw: dict[str, Any] = {}
            if backend == "nccl" and device is not None:
                kw["device_id"] = torch.device(device)
            timeout = timedelta(seconds=timeout_s)
            rg.store = dist.TCPStore("127.0.0.1", port, tp, is_master=rank == 0, timeout=timeout)
            dist.init_process_group(backend, store=rg.store, rank=rank, world_size=tp,
                                    timeout=timeout, **kw)
        return rg

    def close(self, orderly: bool = True) -> dict[str, Any]:
        """Destroy the group on this rank, then the shutdown handshake (idempotent).

        Args:
            orderly: The leader sent its stop command (the followers are leaving too), so rank 0
                waits for them; False on an error path (a follower may be stuck in a collective).

        Returns:
            ``destroy_s`` (this rank's ``destroy_process_group``) and, on rank 0 of an orderly
            stop, ``followers_reported`` (every follower destroyed its group before rank 0
            dropped the store) and ``wait_s``. Empty when already closed.
        """
        import threading

        import torch.distributed as dist

        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        if dist.is_initialized():
            # Bounded: a rank that cannot leave its group still reports its stop.
            th = threading.Thread(target=dist.destroy_process_group, daemon=True)
            th.start()
            th.join(_STOP_WAIT_S)
            out["destroy_s"] = time.perf_counter() - t0
            if th.is_alive():
                out["destroy_timed_out"] = True
                print(f"tp_worker rank {self.rank}: destroy_process_group did not return in "
                      f"{_STOP_WAIT_S} s", file=sys.stderr, flush=True)
        store, self.store = self.store, None
        if store is None:
            return out
        if self.rank != 0:
            try:
                store.set(f"{_STOPPED_KEY}{self.rank}", "1")
            except Exception as exc:  # noqa: BLE001 - the leader is gone: say so, once
                print(f"tp_worker rank {self.rank}: rank 0 closed the store before this rank "
                      f"reported its stop ({type(exc).__name__})", file=sys.stderr, flush=True)
        elif orderly and self.tp > 1:
            t1 = time.perf_counter()
            try:
                store.wait([f"{_STOPPED_KEY}{r}" for r in range(1, self.tp)],
                           timedelta(seconds=_STOP_WAIT_S))
                out["followers_reported"] = True
            except Exception as exc:  # noqa: BLE001 - a follower died: stop anyway
                out["followers_reported"] = False
                print(f"tp_worker rank 0: followers did not report their stop in {_STOP_WAIT_S} s "
                      f"({type(exc).__name__})", file=sys.stderr, flush=True)
            out["wait_s"] = time.perf_counter() - t1
        del store
        return out


def _rank_engine(tcfg: TPWorkerConfig, rank: int, port: int,
                 group_out: list[RankGroup]) -> tuple[TPInferenceEngine, dict]:
    """Join the group and build this rank's engine; returns it and its start-up timings.

    The rank's :class:`RankGroup` is appended to ``group_out`` as soon as the group exists, so
    the caller can close it even when building the engine fails.
    """
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    dev = tcfg.rank_devices()[rank]
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    else:
        torch.set_num_threads(max(1, tcfg.cpu_threads))
    rg = RankGroup.join(tcfg.dist_backend(), rank, tcfg.tp, port,
                        dev if dev.startswith("cuda") else None, tcfg.collective_timeout_s)
    group_out.append(rg)
    group = dist.group.WORLD if tcfg.tp > 1 else None
    t1 = time.perf_counter()
    eng = TPInferenceEngine(replace(tcfg.worker, device=dev), rank=rank, tp=tcfg.tp, group=group)
    return eng, {"dist_init_s": t1 - t0, "build_s": eng.build_s}


def _teardown(groups: list[RankGroup], eng: TPInferenceEngine | None = None) -> dict[str, Any]:
    """Release the followers (leader), then close this rank's group in order (see RankGroup).

    Returns:
        What :meth:`RankGroup.close` reports (empty on a second call).
    """
    orderly = eng is not None
    out: dict[str, Any] = {}
    if eng is not None and eng.is_leader:
        try:
            eng.shutdown()
        except Exception:  # noqa: BLE001 - a broken group: close without the handshake
            orderly = False
    if eng is not None and eng.tp > 1:
        # Graphs holding NCCL collectives must go before the communicator (see GraphedPasses).
        out["graphs_released"] = eng.runner.release()
    for g in groups:
        out.update(g.close(orderly=orderly))
    return out


def _follower_main(tcfg: TPWorkerConfig, rank: int, port: int) -> None:  # pragma: no cover
    groups: list[RankGroup] = []
    eng = None
    try:
        eng, _ = _rank_engine(tcfg, rank, port, groups)
        eng.serve_commands()
    finally:
        _teardown(groups, eng)


def _leader_main(conn: Any, tcfg: TPWorkerConfig, port: int) -> None:  # pragma: no cover
    groups: list[RankGroup] = []
    eng = None
    try:
        eng, info = _rank_engine(tcfg, 0, port, groups)
        t0 = time.perf_counter()
        info["graphs_captured"] = eng.warmup()
        eng.sync()
        info["warmup_s"] = time.perf_counter() - t0
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        _teardown(groups)
        return
    conn.send(("ready", info))

    def stop() -> dict[str, Any]:
        return _teardown(groups, eng)

    try:
        serve_pipe(eng, conn, on_stop=stop)
    finally:
        _teardown(groups, eng)


def _mp_context(tcfg: TPWorkerConfig) -> Any:
    ctx = mp.get_context(tcfg.start_method)
    if tcfg.start_method == "forkserver":
        ctx.set_forkserver_preload(["torch", "llm_cluster_gym.envs.real.tp_worker"])
    return ctx


def _spawn_followers(ctx: Any, tcfg: TPWorkerConfig, port: int) -> list[Any]:
    procs = []
    for r in range(1, tcfg.tp):
        p = ctx.Process(target=_follower_main, args=(tcfg, r, port), daemon=True)
        p.start()
        procs.append(p)
    return procs


def _stop_procs(procs: Sequence[Any], timeout_s: float) -> None:
    """Join each process (it stops on its own), then terminate the ones still alive."""
    deadline = time.time() + timeout_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.time()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)


class TPWorkerProcess(PipeWorkerClient):
    """One tensor-parallel engine in ``tp`` spawned processes, driven over a pipe to rank 0.

    The interface of :class:`envs.real.worker.WorkerProcess`. ``start_info`` holds the start-up
    timings: ``spawn_to_ready_s`` (wall time of the constructor) and, from the leader,
    ``dist_init_s``, ``build_s`` (weights created or loaded, KV cache allocated) and
    ``warmup_s`` (CUDA-graph capture).

    Raises:
        TPWorkerError: Bad config, or a rank failed to start (message from the leader).
    """

    def __init__(self, config: TPWorkerConfig) -> None:
        t0 = time.perf_counter()
        self.stop_info: dict[str, Any] = {}
        config.validate()
        self.config = config
        port = config.master_port or _free_port()
        ctx = _mp_context(config)
        self._conn, child = ctx.Pipe()
        self._leader = ctx.Process(target=_leader_main, args=(child, config, port), daemon=True)
        self._leader.start()
        self._followers = _spawn_followers(ctx, config, port)
        if not self._conn.poll(config.start_timeout_s):
            self.close()
            raise TPWorkerError(f"TP worker on {config.rank_devices()} did not start in "
                                f"{config.start_timeout_s} s")
        kind, msg = self._conn.recv()
        if kind != "ready":
            self.close()
            raise TPWorkerError(f"TP worker on {config.rank_devices()} failed to start: {msg}")
        self.start_info: dict[str, Any] = {**msg, "spawn_to_ready_s": time.perf_counter() - t0}

    @property
    def alive(self) -> bool:
        """True while every rank's process runs."""
        return self._leader.is_alive() and all(p.is_alive() for p in self._followers)

    def close(self, timeout_s: float = 60.0) -> float:
        """Stop every rank; returns the seconds it took.

        Afterwards ``stop_info`` holds the leader's shutdown report (``destroy_s``,
        ``followers_reported``, ``wait_s``: see ``RankGroup.close``) and every rank's
        ``exitcodes``.
        """
        t0 = time.perf_counter()
        if self._leader.is_alive():
            try:
                self._conn.send(("stop", None))
                if self._conn.poll(timeout_s):
                    kind, payload = self._conn.recv()
                    if kind == "stopped" and payload:
                        self.stop_info.update(payload)
            except (BrokenPipeError, EOFError, OSError):
                pass
        procs = [self._leader, *self._followers]
        _stop_procs(procs, timeout_s)
        self.stop_info["exitcodes"] = [p.exitcode for p in procs]
        return time.perf_counter() - t0


def build_tp_workers(worker: WorkerConfig, gpus: Sequence[int], tp: int,
                     **kwargs: Any) -> list[TPWorkerProcess]:
    """TP workers over consecutive groups of ``tp`` GPUs (for ``RealCluster(workers=...)``).

    Raises:
        TPWorkerError: ``len(gpus)`` is not a multiple of ``tp``.
    """
    gpus = list(gpus)
    if tp < 1 or len(gpus) % tp:
        raise TPWorkerError(f"build_tp_workers: {len(gpus)} GPUs {gpus} do not split into groups "
                            f"of tp={tp}")
    out = []
    for i in range(0, len(gpus), tp):
        devs = tuple(f"cuda:{g}" for g in gpus[i:i + tp])
        out.append(TPWorkerProcess(TPWorkerConfig(worker=worker, tp=tp, devices=devs, **kwargs)))
    return out


# ---------------------------------------------------------------------------------------------
# Running a function on the leader (profiling, tests)
# ---------------------------------------------------------------------------------------------


def _run_leader(q: Any, tcfg: TPWorkerConfig, port: int, fn: Callable[..., Any],
                args: tuple) -> None:  # pragma: no cover - child process
    groups: list[RankGroup] = []
    eng = None
    try:
        eng, info = _rank_engine(tcfg, 0, port, groups)
        if tcfg.worker.cuda_graphs is not False:
            t0 = time.perf_counter()
            info["graphs_captured"] = eng.warmup()
            info["warmup_s"] = time.perf_counter() - t0
        q.put(("ok", fn(eng, info, *args)))
    except BaseException as exc:  # report anything, including KeyboardInterrupt
        q.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        _teardown(groups, eng)


def run_tp(tcfg: TPWorkerConfig, fn: Callable[..., Any], *args: Any,
           timeout_s: float | None = None) -> Any:
    """Build a TP engine on ``tcfg.tp`` processes and return ``fn(leader_engine, info, *args)``.

    ``fn`` runs in the leader's process (it must be a picklable module-level function; its result
    must pickle); the followers execute the passes it makes. ``info`` holds the start-up timings.

    Raises:
        TPWorkerError: ``fn`` or a rank failed, or the run took longer than ``timeout_s``.
    """
    tcfg.validate()
    port = tcfg.master_port or _free_port()
    ctx = _mp_context(tcfg)
    q = ctx.Queue()
    leader = ctx.Process(target=_run_leader, args=(q, tcfg, port, fn, args), daemon=True)
    leader.start()
    followers = _spawn_followers(ctx, tcfg, port)
    limit = timeout_s if timeout_s is not None else tcfg.start_timeout_s
    try:
        kind, res = q.get(timeout=limit)
    except Exception as exc:  # queue.Empty
        _stop_procs([leader, *followers], 1.0)
        raise TPWorkerError(f"run_tp on {tcfg.rank_devices()}: no result in {limit} s") from exc
    _stop_procs([leader, *followers], 60.0)
    if kind != "ok":
        raise TPWorkerError(f"run_tp on {tcfg.rank_devices()}: {res}")
    return res


def _reference_fn(eng: TPInferenceEngine, info: dict, prompts: list[list[int]],
                  decode_steps: int) -> dict[str, Any]:  # pragma: no cover - child process
    torch = eng.torch
    logits: list[Any] = []
    hook = eng.passes.model.lm_head.register_forward_hook(
        lambda _m, _i, out: logits.append(out.detach().float().cpu().numpy().copy()))
    try:
        with torch.inference_mode():
            for slot, p in enumerate(prompts):
                first = eng.prefill(torch.tensor(p, dtype=torch.long, device=eng.device), slot)
                eng.passes.tok[slot] = first
                eng.passes.pos[slot] = len(p)
            n = len(prompts)
            pre = list(logits)
            logits.clear()
            toks = [eng.passes.tok[:n].cpu().numpy().copy()]
            for _ in range(decode_steps):
                max_pos = int(eng.passes.pos[:n].max())
                eng.decode_step(n, max_pos)
                toks.append(eng.passes.tok[:n].cpu().numpy().copy())
    finally:
        hook.remove()
    return {"prefill_logits": pre, "decode_logits": list(logits), "tokens": toks,
            "tp": eng.tp}


def reference_logits(tcfg: TPWorkerConfig, prompts: list[list[int]],
                     decode_steps: int = 3) -> dict[str, Any]:
    """Logits of a prefill of each prompt (one per slot) and of ``decode_steps`` batched decodes.

    Runs the serving passes of the leader (``prefill``/``decode_step``) with a hook on
    ``lm_head``; for checking that TP N computes what TP 1 computes (use ``cuda_graphs=False``:
    hooks do not fire on graph replay).

    Returns:
        ``prefill_logits`` (one ``[1, vocab]`` array per prompt), ``decode_logits`` (one
        ``[batch_bucket, vocab]`` per step), ``tokens`` (token per sequence after each pass).
    """
    return run_tp(tcfg, _reference_fn, [list(map(int, p)) for p in prompts], int(decode_steps))
