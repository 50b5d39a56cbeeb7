"""Training and evaluation: stage 1 (distillation from the cache), stage 2 (routers + task heads), TIGER,
their options, losses, metrics, targets (cached or live teachers) and DDP plumbing. The run folder, its
record, checkpoints, resume and the training loop are student/run/'s, shared by the three trainers."""
