"""Shared fixtures: one local Ray for the whole session, small procedural photos, and the tiny caches
that many modules train from, each extracted once per session (`tiny_caches`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sak.pipeline.sources.synthetic import make_photo

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# tests talk to 127.0.0.1 only: no cloud client may reach a metadata endpoint for credentials
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("NO_GCE_CHECK", "true")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The local S3 server (`s3_server`) is named in the environment before any Ray starts, so that Ray's worker
# processes (which inherit the environment at ray.init) reach it through the standard variables too.
S3_PORT = _free_port()
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "sak-test-key-id",
    "AWS_SECRET_ACCESS_KEY": "sak-test-secret-key-not-real",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(S3_ENV)

# The local GCS emulator (`gcs_server`), named the same way: gcsfs honours STORAGE_EMULATOR_HOST (and then
# talks plain HTTP, anonymously). gcsfs's experimental zonal/HNS layer asks a gRPC API that no emulator
# serves (60 s timeouts per bucket), so it is switched off before gcsfs is first imported.
GCS_PORT = _free_port()
GCS_ENV = {
    "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{GCS_PORT}",
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
}
os.environ.update(GCS_ENV)


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session (stopped at the end); yields a bucket factory."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=S3_ENV["AWS_ENDPOINT_URL"])
    made = set()

    def bucket(name: str) -> str:
        if name not in made:
            client.create_bucket(Bucket=name)
            made.add(name)
        return f"s3://{name}"

    try:
        yield bucket
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """The gcp-storage-emulator on 127.0.0.1 for the session (in memory, stopped at the end), holding one
    bucket; yields its URL."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    server = create_server("127.0.0.1", GCS_PORT, in_memory=True, default_bucket="sak-gs")
    server.start()
    try:
        yield "gs://sak-gs"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every test that extracts (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a new embedded Ray, whatever cluster this machine may also be running
            num_cpus=2,
            object_store_memory=300 * 1024 * 1024,
            include_dashboard=False,
            logging_level="WARNING",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """Six images of assorted sizes and formats, one in a subfolder."""
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    sizes = [(160, 120), (96, 128), (200, 90), (120, 120), (140, 100), (64, 80)]
    for i, (w, h) in enumerate(sizes):
        path = root / ("sub" if i == 5 else ".") / f"photo{i}.{'jpg' if i % 2 else 'png'}"
        make_photo(i, w, h).save(path, quality=95) if i % 2 else make_photo(i, w, h).save(path)
    return root


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP barriers on busy shared cores cost
    seconds per step: compute on one thread (restored afterwards). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_TEACHERS = ("dinov2_tiny", "clip_tiny", "sam_tiny")


@dataclass
class TinyCaches:
    """Tiny caches of `photo_dir` (64 px, shards of 4 views), each extracted on first use and then
    shared by every test of the session: one extraction instead of one per module.

    They are READ-ONLY: a test that damages, extends or rewrites a cache works on `copy(...)`."""

    root: Path
    source: Path
    built: dict[tuple, Path] = field(default_factory=dict)

    def get(
        self, codec: str = "fp16", views_per_image: int = 2, teachers: tuple[str, ...] = TINY_TEACHERS
    ) -> Path:
        from sak.pipeline.extraction.config import ExtractConfig
        from sak.pipeline.extraction.driver import run_extraction

        key = (codec, views_per_image, teachers)
        if key not in self.built:
            out = self.root / f"{codec}-v{views_per_image}-{'-'.join(t.split('_')[0] for t in teachers)}"
            run_extraction(
                ExtractConfig(
                    source=str(self.source), out=str(out), teachers=teachers, views_per_image=views_per_image,
                    size=64, shard_size=4, codec=codec, progress=False,
                )
            )  # fmt: skip
            self.built[key] = out
        return self.built[key]

    def copy(self, dest: Path, **kw) -> Path:
        """A private, writable copy of `get(**kw)` at `dest`."""
        import shutil

        return Path(shutil.copytree(self.get(**kw), dest))


@pytest.fixture(scope="session")
def tiny_stage1_run(tiny_caches, tmp_path_factory) -> Path:
    """A 2-step stage-1 run of the tiny student on the 1-view tiny cache (what stage 2 starts from).
    Read-only: stage-2 tests write their own folders and link this run in."""
    from sak.student.train.stage1 import train_stage1
    from sak.student.train.stage1_config import Stage1Config

    out = tmp_path_factory.mktemp("tiny_stage1") / "s1"
    cache = tiny_caches.get(views_per_image=1)
    train_stage1(Stage1Config.debug(str(cache), str(out), steps=2, batch_size=2, eval_every=0))
    return out


@pytest.fixture(scope="session")
def tiny_caches(ray_local, photo_dir, tmp_path_factory) -> TinyCaches:
    return TinyCaches(tmp_path_factory.mktemp("tiny_caches"), photo_dir)
