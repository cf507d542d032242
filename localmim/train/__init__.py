"""Training machinery shared by every training stage (pretrain, finetune, linprobe).

Generic, framework-level modules: :mod:`.schedule` (warm-up + cosine lr), :mod:`.checkpoint` (self-describing,
atomic, auto-resumed checkpoints),
:mod:`.optim` (AdamW with weight-decay groups) and the loops (:mod:`.pretrain`). Nothing here imports MLflow or
``localmim.stages``: loops take plain arguments and a ``log_fn(metrics, step)`` callback.
"""
