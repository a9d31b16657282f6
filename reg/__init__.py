"""The code train.py, generate.py, sweep.py and the tools share, one module per job.

Run safety      folder_lock (one writer per folder), slurm (launch checks), stop_signals (SIGTERM/SIGUSR1),
                processes (a command's scope, the process setup of the sampling commands)
Run records     resume_flags (what each train.py flag does on resume), trackers, mixed_precision,
                run_log (metrics.jsonl), run_identity (what a results folder was made from),
                data_index (the data reader's listing as memory-mapped arrays)
Checkpoints     checkpoints (files and the training folder), hub (local paths and the HF Hub),
                loading (the one loader of a generator), export (Hub folders and model cards)
Training        train_step (one optimisation step, exactly resumable), throughput (FLOPs, MFU),
                data_check (the data against encode's record, before the first step)
Sampling        seeded_images (images from per-image seeds), class_grid (--class-labels and labelled grids),
                pipeline (REGPipeline: one-call sampling in Python)
Set-up          constraints (install around a cluster's own torch), prefetch (fill the caches for offline nodes)
Ground          interpolant (the path alpha(t), sigma(t)), utils (atomic writes, command-line helpers)

The model, loss, samplers and dataset stay at the top of the repository, where REG's code has them.
docs/design.md#data-flow gives the floors: which module may import which.
"""
