"""An LLM inference worker for one GPU: a Llama-architecture model with continuous batching.

This module is the worker's public face; each concern lives in a module of its own:

* ``worker_config``: :class:`WorkerConfig`, :class:`ModelShape`, :data:`SHAPES`,
  :func:`shape_from_hf_config`, :class:`WorkerError` (what to build, validated);
* ``llama``: the model maths (:class:`~llm_cluster_gym.envs.real.llama.LlamaPasses`: an HF-named
  Llama decoder, its static KV cache, the prefill and the chunked or padded decode pass;
  :func:`finish_weight_load`);
* ``graphs``: bucketing and CUDA-graph capture/replay of those passes
  (:class:`~llm_cluster_gym.envs.real.graphs.GraphedPasses`);
* ``engine``: :class:`InferenceEngine`, the continuous-batching scheduler (queue, batch cap,
  admission, TTFT/TBT bookkeeping, the step log);
* ``step_timing``: isolated timings of an idle engine's passes;
* ``records``: :class:`Request`, :class:`Completed`, :class:`EngineStats`,
  :class:`WorkerReport`, :data:`STEP_LOG_COLUMNS`;
* ``worker_process``: :class:`InlineWorker` (the caller's thread), :class:`WorkerProcess` (one
  spawned process per GPU behind a pipe), :func:`serve_pipe`, :class:`PipeWorkerClient`.
"""

from __future__ import annotations

from llm_cluster_gym.envs.real.engine import InferenceEngine
from llm_cluster_gym.envs.real.llama import finish_weight_load
from llm_cluster_gym.envs.real.records import (
    STEP_LOG_COLUMNS,
    Completed,
    EngineStats,
    Request,
    WorkerReport,
)
from llm_cluster_gym.envs.real.worker_config import (
    SHAPES,
    ModelShape,
    WorkerConfig,
    WorkerError,
    shape_from_hf_config,
)
from llm_cluster_gym.envs.real.worker_process import (
    InlineWorker,
    PipeWorkerClient,
    WorkerProcess,
    serve_pipe,
)

__all__ = [
    "SHAPES",
    "STEP_LOG_COLUMNS",
    "Completed",
    "EngineStats",
    "InferenceEngine",
    "InlineWorker",
    "ModelShape",
    "PipeWorkerClient",
    "Request",
    "WorkerConfig",
    "WorkerError",
    "WorkerProcess",
    "WorkerReport",
    "finish_weight_load",
    "serve_pipe",
    "shape_from_hf_config",
]
