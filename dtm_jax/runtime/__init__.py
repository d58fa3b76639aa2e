"""What a run stands on: errors, launch, CPU-host set-up, compilation cache, preemption, workdir lock, checkpoints,
metrics."""
