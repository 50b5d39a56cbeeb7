"""The SAK student: model, loss, cache loader, trainer, checkpoints."""
