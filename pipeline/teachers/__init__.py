"""Teachers: the registered specs, where their weights come from, and their multi-level forward."""
