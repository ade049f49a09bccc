"""Training without Ray: the same code runs in a Ray Train worker (jobs/training/worker.py, the recipe that reads top
to bottom), in a plain single-process loop (benchmarks/train_throughput.py) and in unit tests. One module a concern:

- `lr`: the peak learning rate and why (the reference's rule, the model-size rule, LoRA), the stalled-loss warning
- `schedule`: how many optimiser steps a run takes, AdamW, linear warm-up then cosine decay to a floor
- `batches`: packed rows -> micro-batches, their weights rescaled to the training mode's rewards
- `attention`, `precision`: which attention implementation and which autocast dtype train on the device
- `loss`: the C-RLFT loss, normalised by the weight sum of the global batch
- `step`: one optimiser step over `grad_accum` micro-batches, and the validation pass
- `wrap`: LoRA through peft, gradient checkpointing, FSDP2
- `rng`, `checkpoint`: seeding, and what a checkpoint holds (weights, optimiser, scheduler, position, RNG states)

The exported model is built from the final checkpoint by `crlft.export.export_checkpoint`.
"""
