"""Shape-based performance and power model of LLM serving on H100, H200 and B200 (issue 17).

`shapes` reads a model's Hugging Face ``config.json``; `hardware` the GPUs' datasheet figures;
`collectives` the measured tensor-parallel all-reduce table; `step` times one engine step and
its power from the work it does; `scheduler` replays vLLM's default scheduler (chunked prefill,
paged KV cache, preemption) in a closed loop; `serving` combines them into steady-state figures;
`calibration` fits the per-GPU coefficients to ML.ENERGY's published runs and checks them
(``bench/fidelity_public.py``). ``llm-cluster predict`` is the command-line what-if.
"""
