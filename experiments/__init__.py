"""experiments: what measures the method; imported by nothing (but the tests). Run from the repository root:

    python -m experiments.ablation ablation ...     the ablation on the demo; `her2st` on real sections; `balance`
    python -m experiments.benchmark ...             what it costs: data serving, the training step, an epoch, --gpu-check
    benchmark_scale                                 the benchmark's other sections: ddp, scale, encoders, slide
    fold_benchmark                                  a synthetic her2st-shaped fold and one timed epoch (the GPU check's)
    measure                                         timing and memory helpers, synthetic slides
"""
