"""The real GPU node behind the ClusterBackend protocol.

``telemetry`` reads GPUs through NVML (or replays a recorded file, which is how CPU tests
run), ``actuators`` guards the privileged GPU settings (off unless explicitly enabled),
``worker`` serves a Llama-architecture model with continuous batching on one GPU, and
``cluster`` ties them into :class:`envs.real.cluster.RealCluster`.
"""
