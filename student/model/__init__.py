"""The student networks and their weights on disk: the stage-1 student (stem + adapter paths), the stage-2
multi-task model (routers + heads), and the loaders of the authors' checkpoints."""
