"""Which source images a cache holds, said and recorded: GIF, BMP and TIFF are read (first frame), image
types ingest cannot read are named in the skipped list with the fix, EXIF orientation tags are counted in
cache.json (never applied), and a small file of huge pixels is refused by the decode-ratio guard."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sak.pipeline.base.errors import BadImage
from sak.pipeline.extraction.ingest import ingest
from sak.pipeline.format.documents import read_cache
from sak.pipeline.sources.images import check_image, decode_image
from sak.pipeline.sources.limits import ImageLimits
from sak.pipeline.sources.synthetic import make_photo
from sak.pipeline.sources.views import ViewPlan


def _animated_gif(path) -> None:
    frames = [make_photo(i, 80, 60).convert("P") for i in range(2)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)


def _rotated_jpeg(path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    make_photo(9, 90, 70).save(path, exif=exif, quality=90)


def test_gif_bmp_tiff_are_read_and_unsupported_types_are_named_in_the_skipped_list(ray_local, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    make_photo(0, 64, 48).save(src / "a.jpg")
    _animated_gif(src / "b.gif")
    make_photo(2, 70, 50).save(src / "c.tif")
    make_photo(3, 50, 70).save(src / "d.bmp")
    (src / "e.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    _rotated_jpeg(src / "f.jpeg")
    out = tmp_path / "cache"
    out.mkdir()
    ingest(str(src), out, ViewPlan(seed=0, views_per_image=1, size=32), 4,
           limit=None, limits=ImageLimits(), progress=False)  # fmt: skip
    dataset = read_cache(out).dataset
    assert dataset.num_images == 5 and dataset.num_inputs == 6
    (skipped,) = dataset.skipped
    assert (
        skipped.key == "e" and "unsupported image type .heic" in skipped.reason and "JPEG" in skipped.reason
    )
    assert dataset.exif_oriented == 1  # f.jpeg: recorded, its stored pixels used
    gif = Image.open(src / "b.gif")
    first = np.asarray(gif.convert("RGB"))
    from sak.pipeline.sources.listing import list_source, read_bytes

    (item,) = [it for it in list_source(src) if it.key == "b"]
    ((_, data),) = list(read_bytes([item]))
    assert np.array_equal(decode_image(data).permute(1, 2, 0).numpy(), first)  # the first frame


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def test_a_small_file_of_huge_pixels_is_refused_by_the_decode_ratio():
    bomb = _png(12000, 12000)  # 144 Mpx: under --max-pixels, but ~140 KB would decode to 412 MiB
    assert len(bomb) < 1_000_000
    with pytest.raises(BadImage, match=r"decompression ratio \d+x: 12000x12000 .* > max_decode_ratio=250"):
        check_image(bomb)
    flat = _png(640, 480)  # a flat small image compresses as well, but is below the 16 Mpx floor
    assert check_image(flat).width == 640


def test_the_decode_ratio_is_an_option_recorded_in_the_cache(tiny_caches):
    record = read_cache(tiny_caches.get()).dataset.ingest
    assert record is not None and record.max_decode_ratio == 250.0
