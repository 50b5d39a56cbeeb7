"""gs:// for real: extraction on embedded Ray into a GCS bucket (the gcp-storage-emulator of `gcs_server`,
through gcsfs), `verify` on the bucket, and stage-1 steps streamed from it equal to those from a local copy."""

from __future__ import annotations

import pytest

from sak.cli.cache import main as cache_main
from sak.pipeline.buckets.bucket import Bucket
from sak.pipeline.buckets.mirror import STAGE_ENV, pull
from sak.pipeline.extraction.config import ExtractConfig
from sak.pipeline.extraction.driver import run_extraction
from sak.student.train.stage1 import train_stage1
from sak.student.train.stage1_config import Stage1Config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_extract_verify_and_train_from_a_gcs_bucket(
    gcs_server, ray_local, photo_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(STAGE_ENV, str(tmp_path / "stage"))
    url = f"{gcs_server}/team/tiny"
    cfg = ExtractConfig(
        views_per_image=2, source=str(photo_dir), out=url, teachers=("dinov2_tiny",), size=64, shard_size=4, limit=4, progress=False
    )  # fmt: skip
    run_extraction(cfg)
    objects = Bucket(url).listing()
    assert "cache.json" in objects and ".sak-lock" not in objects and any("/c/" in rel for rel in objects)
    assert cache_main(["verify", url]) == 0 and f"{url}: OK" in capsys.readouterr().out
    local = tmp_path / "copy"
    pull(Bucket(url), local, bulk=True)
    kw = dict(steps=4, batch_size=4, eval_every=0, holdout_shards=1)
    from_local = train_stage1(Stage1Config.debug(str(local), str(tmp_path / "r_local"), **kw))
    from_bucket = train_stage1(Stage1Config.debug(url, str(tmp_path / "r_gs"), **kw))  # by byte range
    assert len(from_bucket.losses) == 4 and from_bucket.losses == from_local.losses
