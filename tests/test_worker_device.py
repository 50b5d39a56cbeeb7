"""The extraction actor's device comes from Ray's GPU assignment, not from whether the process sees a GPU:
a CPU actor on a GPU node (`--device cpu`, or more actors than GPUs) must stay off the GPU."""

from __future__ import annotations

import os
import subprocess
import sys

# its own Ray (the session's has no GPU resource), told it has one GPU: Ray assigns it to the GPU task
SCRIPT = """
import ray
ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="ERROR")
from sak.pipeline.extraction.worker import assigned_device
probe = ray.remote(assigned_device)
print(ray.get(probe.options(num_gpus=1).remote()), ray.get(probe.options(num_gpus=0).remote()))
ray.shutdown()
"""


def test_device_follows_the_gpu_ray_assigned():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cuda", "cpu"]
