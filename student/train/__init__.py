"""Training and evaluation: stage 1 (distillation from the cache), stage 2 (routers + task heads), their
losses, metrics, checkpoints, targets (cached or live teachers) and DDP plumbing."""
