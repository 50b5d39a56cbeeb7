"""The node probes refusing for real (slow tier), on a Ray head (`ray start --head`) and a worker node:
started inside a private mount namespace (`unshare -m`) where a tmpfs hides the cache's parent folder, that
node cannot see the driver's files, and `sak-cache run --address` into that local folder must refuse in one
line naming the worker node, before any work; started without the bucket credentials, that node cannot
write the bucket (moto on 127.0.0.1), and a run into the bucket must refuse the same way.

Everything runs in process groups this test starts (each `Popen(start_new_session=True)`), and is stopped
by signalling those groups only (never `ray stop`, which would stop every Ray on the machine). The cluster
uses its own auth token (RAY_AUTH_TOKEN in the environment of its processes), not ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus", "1",
       "--object-store-memory", str(100 * 2**20), "--block"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> bool:
    try:
        return (
            subprocess.run(["unshare", "-m", "--propagation", "private", "true"], timeout=30).returncode == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """Stop one process group this test started: SIGTERM (ray start --block stops its services), then
    SIGKILL whatever is left of the group."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (workers, agents)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _worker_nodes(address: str, env: dict) -> list[str]:
    """IDs (12 characters, as the probe names them) of the alive nodes with the `node_b` resource."""
    code = (
        f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
        "print(json.dumps([n['NodeID'][:12] for n in ray.nodes() if n['Alive'] and 'node_b' in n['Resources']]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return (
        json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else []
    )


@contextmanager
def _two_node_cluster(tmp_path: Path, node_env: dict | None = None, node_wrap: str | None = None):
    """A Ray head and one worker node (`node_b` resource) on 127.0.0.1, with their own auth token; the
    node's environment may differ (node_env) and its command may be wrapped (node_wrap: a shell script with
    {node} for the command). Yields (address, env, the worker node's id); stops both at the end."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # fmt: skip
    logs = tmp_path / "logs"
    logs.mkdir()
    ray_tmp = Path(tempfile.mkdtemp(prefix="sakp-", dir="/tmp"))  # Ray's socket paths must stay < 108 bytes
    started: list[subprocess.Popen] = []
    try:
        head = [*RAY, "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
                "--temp-dir", str(ray_tmp / "head"), "--include-dashboard", "false"]  # fmt: skip
        started.append(subprocess.Popen(head, env=env, start_new_session=True, stdout=open(logs / "head.log", "w"),
                                        stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + 120
        while not _listening(port) and time.monotonic() < deadline and started[0].poll() is None:
            time.sleep(0.5)  # the head's GCS is up before a node joins (ray.init to it would block)
        node = [*RAY, "--address", address, "--node-ip-address", "127.0.0.1",
                "--temp-dir", str(ray_tmp / "node"), "--resources", json.dumps({"node_b": 1})]  # fmt: skip
        if node_wrap:
            node = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                    node_wrap.format(node=" ".join(map(repr, node)))]  # fmt: skip
        started.append(
            subprocess.Popen(node, env={**env, **(node_env or {})},
                             start_new_session=True, stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT)
        )  # fmt: skip
        deadline, workers = time.monotonic() + 180, []
        while not workers and time.monotonic() < deadline and all(p.poll() is None for p in started):
            time.sleep(2)
            workers = _worker_nodes(address, env)
        assert len(workers) == 1, (logs / "head.log").read_text()[-1500:] + (logs / "node.log").read_text()[
            -1500:
        ]
        yield address, env, workers[0]
    finally:
        for proc in reversed(started):
            _stop(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _one_error_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith("sak-cache: error:")]
    assert run.returncode == 2 and len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return lines[0]


@pytest.mark.skipif(not _can_unshare(), reason="needs root and `unshare -m` (a private mount namespace)")
def test_a_node_that_cannot_see_the_local_out_is_refused_by_name(photo_dir, tmp_path, capsys):
    parent = tmp_path / "cache_parent"  # hidden from the worker node by a tmpfs over it
    (parent / "cache").mkdir(parents=True)
    hide = f"mount -t tmpfs sak-probe-test {parent} && exec {{node}}"
    with _two_node_cluster(tmp_path, node_wrap=hide) as (address, env, worker):
        cmd = [sys.executable, "-m", "sak.cli.cache", "run", "--address", address, "--source", str(photo_dir),
               "--out", str(parent / "cache"), "--teachers", "dinov2_tiny", "--size", "64", "--no-progress"]  # fmt: skip
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    line = _one_error_line(run)
    assert f"node {worker}" in line and "cannot see the driver's files" in line and "a bucket" in line
    assert {p.name for p in (parent / "cache").iterdir()} <= {
        ".sak-lock"
    }  # refused before any work, probes removed
    with capsys.disabled():
        print(f"\nnode probe: {line}")


def test_a_node_without_the_bucket_credentials_is_refused_by_name(s3_server, photo_dir, tmp_path, capsys):
    from sak.pipeline.buckets.bucket import Bucket

    url = s3_server("sak-nodes") + "/team/c"  # moto on 127.0.0.1: the driver and the head have its key
    no_credentials = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                      "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}  # fmt: skip
    with _two_node_cluster(tmp_path, node_env=no_credentials) as (address, env, worker):
        cmd = [sys.executable, "-m", "sak.cli.cache", "run", "--address", address, "--source", str(photo_dir),
               "--out", url, "--teachers", "dinov2_tiny", "--size", "64", "--no-progress"]  # fmt: skip
        env = {**env, "SAK_STAGE_DIR": str(tmp_path / "stage")}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    line = _one_error_line(run)
    assert f"node {worker} (" in line and f"cannot write {url}: no usable credentials" in line
    assert "AWS_ACCESS_KEY_ID" in line
    assert "every node needs the driver's bucket credentials" in line
    assert Bucket(url).listing() == {}  # refused before the ingest: no lock, no probe object left
    with capsys.disabled():
        print(f"\nbucket node probe: {line}")
