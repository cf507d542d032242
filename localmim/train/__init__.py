"""Training loops of every training stage: :mod:`.pretrain` (method §7), :mod:`.finetune` (§8), :mod:`.linprobe`
(MAE's linear probe), :mod:`.segment` (UperNet, §9.1) and :mod:`.detect` (Mask R-CNN, §9.2).

Each loop keeps only its method; what they share is :mod:`.engine` (the optimizer step with accumulation and
loss scaling, the non-finite-loss guard, the checkpoint identity rule and resume), on the runtime room
(:mod:`localmim.runtime`: seeding, the process group and the one DDP wrap, precision, the checkpoint file format),
:mod:`.schedule` (the lr schedules) and :mod:`.optim` (AdamW with weight-decay groups). Nothing here imports
MLflow, the pipeline or ``localmim.stages``: loops take plain arguments and a ``log_fn(metrics, step)`` callback,
and write nothing but checkpoints (and fine-tuning's best/last weights next to them).
"""
