"""`inspect` tells two stores of one teacher apart: weights, compressor and grid per store, and the raw
student views of the cache, in the text and in `--json`."""

import json

from sak.cli.cache import main as cache_main


def test_inspect_shows_what_tells_two_stores_of_one_teacher_apart(ray_local, photo_dir, tmp_path, capsys):
    out = tmp_path / "c"
    common = ["run", "--source", str(photo_dir), "--out", str(out), "--teachers", "dinov2_tiny",
              "--random-init", "--size", "32", "--shard-size", "4", "--limit", "4", "--no-progress"]  # fmt: skip
    assert cache_main([*common, "--student-views", "raw"]) == 0
    assert cache_main([*common, "--compressor", "zstd", "--grid", "2x2"]) == 0
    capsys.readouterr()
    assert cache_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "student  raw views 32x32" in text
    details = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("weights ")]
    assert len(details) == 2 and all("random init, seed 0" in d for d in details)
    assert any("compressor none; native grid" in d for d in details)
    assert any("compressor zstd; grid 2x2" in d for d in details)
    assert cache_main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["student_views"] == 32
    by_compressor = {s["compressor"]: s for s in report["stores"]}
    assert by_compressor["zstd"]["grid"] == [2, 2] and by_compressor["none"]["weights_source"] == "random"
