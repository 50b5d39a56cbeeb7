"""The cluster files: docker/rayjob.yaml parses as a KubeRay RayJob whose every container runs the image
docs/cluster.md builds, and whose entrypoint is the command that page shows."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_cluster_section() -> str:
    return (ROOT / "docs" / "cluster.md").read_text()


def test_rayjob_names_the_image_and_command_the_readme_shows():
    job = yaml.safe_load((ROOT / "docker" / "rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    section = _readme_cluster_section()
    image = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", section).group(1)
    command = re.search(r"The RayJob runs `([^`]+)`", section).group(1)
    assert job["spec"]["entrypoint"] == command
    assert "--address auto" in command and "s3://" in command
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = [c["image"] for g in groups for c in g["template"]["spec"]["containers"]]
    assert images and all(i == image for i in images)
    gpu = [c for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] for c in gpu)
    lock_ray = re.search(r"^ray==(\S+)", (ROOT / "requirements.lock").read_text(), re.M).group(1)
    assert cluster["rayVersion"] == lock_ray
    for c in [c for g in groups for c in g["template"]["spec"]["containers"]]:  # weights on every node
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/models/")
        assert any(m["mountPath"] == "/models" for m in c["volumeMounts"]), c["name"]
    assert "AWS_SECRET" not in (ROOT / "docker" / "rayjob.yaml").read_text().replace(
        "AWS_SECRET_ACCESS_KEY", ""
    )


def test_the_image_installs_the_lock_with_the_bucket_extras():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^s3fs==", lock, re.M) and re.search(r"^gcsfs==", lock, re.M)
