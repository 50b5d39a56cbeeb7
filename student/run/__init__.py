"""A training run as it lives on disk, one way for every trainer (stage 1, stage 2, TIGER): the typed run
record and its schema (record.py), the folder, its lock and metrics log (folder.py), checkpoints
(checkpoint.py), the resume grammar (resume.py) and the harness that runs the loop (harness.py)."""
