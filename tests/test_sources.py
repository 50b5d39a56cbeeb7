"""Sources: listing (folder, tar, parquet), reading bytes back, checking and decoding images."""

from __future__ import annotations

import io
import logging
import os
import random
import struct
import tarfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sak.pipeline.base.errors import BadImage, SakError
from sak.pipeline.sources import tars
from sak.pipeline.sources.images import ImageInfo, check_image, decode_rgb
from sak.pipeline.sources.items import normalise_key
from sak.pipeline.sources.listing import list_source, read_bytes

# ----------------------------------------------------------------------------- helpers


def encode(fmt: str, size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """A small noisy image (noise, so a cut file really is missing data) encoded as `fmt`."""
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    im = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def add_member(
    tar: tarfile.TarFile, name: str, data: bytes, kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height (8-bit grey) followed by one row of pixel data,
    its zlib stream left open (as in a cut file; a stream that ends cleanly but early is a corrupt
    PNG that PIL itself accepts, filling the rest with zeros)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    packer = zlib.compressobj()
    idat = packer.compress(b"\0" * (width + 1)) + packer.flush(zlib.Z_SYNC_FLUSH)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def stored(items) -> dict[str, bytes]:
    return {item.key: data for item, data in read_bytes(items)}


# ----------------------------------------------------------------------------- folders


def test_normalise_key():
    assert normalise_key("./a.b\\c//d.e") == "a_b/c/d_e"
    assert normalise_key("/abs/../x") == "abs/__/x"  # never absolute, never climbs


def test_folder_recursion_keys_and_extensions(tmp_path):
    root = tmp_path / "photos"
    files = {
        "a.jpg": encode("JPEG"),
        "sub/deep/b.JPG": encode("JPEG", seed=1),
        "sub/c.jpeg": encode("JPEG", seed=2),
        "img.v2.png": encode("PNG"),
        "dir.x/d.webp": encode("WEBP"),
        "notes.txt": b"not an image",
        ".hidden.jpg": encode("JPEG"),
        ".cache/e.jpg": encode("JPEG"),
    }
    for rel, data in files.items():
        write(root / rel, data)
    items = list_source(root)
    got = {it.key: (it.ext, it.origin) for it in items}
    assert got == {
        "a": ("jpg", f"{root.as_posix()}/a.jpg"),
        "dir_x/d": ("webp", f"{root.as_posix()}/dir.x/d.webp"),
        "img_v2": ("png", f"{root.as_posix()}/img.v2.png"),
        "sub/c": ("jpg", f"{root.as_posix()}/sub/c.jpeg"),
        "sub/deep/b": ("jpg", f"{root.as_posix()}/sub/deep/b.JPG"),
    }
    for it in items:
        assert it.locator == ("file", str((root / it.origin[len(root.as_posix()) + 1 :]).absolute()))
        assert "." not in it.key and "\\" not in it.key
    assert stored(items)["sub/deep/b"] == files["sub/deep/b.JPG"]


def test_folder_order_is_sorted_and_stable(tmp_path):
    names = [f"{c}{i}.png" for c in "zyxab" for i in range(3)]
    random.Random(0).shuffle(names)
    for name in names:
        write(tmp_path / "src" / name, encode("PNG", size=(32, 32)))
    first, second = list_source(tmp_path / "src"), list_source(str(tmp_path / "src") + "/")
    keys = [it.key for it in first]
    assert keys == sorted(keys) and len(keys) == 15
    assert first == second


def test_folder_duplicate_key_names_both_origins(tmp_path):
    write(tmp_path / "photos/a/b.jpg", encode("JPEG"))
    write(tmp_path / "photos/a/b.png", encode("PNG"))
    with pytest.raises(SakError, match=r"duplicate key 'a/b' from .*photos/a/b\.jpg and .*photos/a/b\.png"):
        list_source(tmp_path / "photos")


def test_keys_colliding_after_dot_replacement_are_duplicates(tmp_path):
    write(tmp_path / "p/x.y.jpg", encode("JPEG"))
    write(tmp_path / "p/x_y.png", encode("PNG"))
    with pytest.raises(SakError, match=r"duplicate key 'x_y' from .*x\.y\.jpg and .*x_y\.png"):
        list_source(tmp_path / "p")


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(SakError, match=r"source .*nope does not exist; pass --source"):
        list_source(tmp_path / "nope")
    write(tmp_path / "empty/readme.txt", b"hi")
    with pytest.raises(SakError, match=r"no images found .*\.jpg, \.jpeg, \.png, \.webp"):
        list_source(tmp_path / "empty")


def test_symlinks_followed_without_looping(tmp_path):
    root = tmp_path / "src"
    write(root / "real/a.png", encode("PNG", size=(32, 32)))
    write(tmp_path / "outside/b.png", encode("PNG", size=(32, 32)))
    os.symlink(root, root / "real/loop")  # a link back to an ancestor
    os.symlink(tmp_path / "outside", root / "linked")
    os.symlink(tmp_path / "missing.png", root / "broken.png")
    assert [it.key for it in list_source(root)] == ["linked/b", "real/a"]


def test_folder_mixing_kinds_is_refused(tmp_path):
    write(tmp_path / "mix/a.jpg", encode("JPEG"))
    write(tmp_path / "mix/shard.tar", b"")
    with pytest.raises(SakError, match=r"mixes 1 image files, 1 \.tar shards"):
        list_source(tmp_path / "mix")


# ----------------------------------------------------------------------------- tar shards


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            add_member(tar, name, data)
    return path


def test_tar_written_with_tarfile(tmp_path):
    members = {
        "a.jpg": encode("JPEG"),
        "a.cls": b"3",
        "sub/b.PNG": encode("PNG"),
        "c.jpeg": encode("JPEG", seed=1),
        "./d.webp": encode("WEBP"),
        "e.seg.png": encode("PNG", seed=2),  # field "seg.png" of sample "e", not an image sample
    }
    shard = make_tar(tmp_path / "shard-000.tar", members)
    items = list_source(shard)
    assert [(it.key, it.ext) for it in items] == [("a", "jpg"), ("c", "jpg"), ("d", "webp"), ("sub/b", "png")]
    assert items[0].origin == f"{shard}:a.jpg"
    assert items[0].locator == ("tar", str(shard.absolute()), "a.jpg")
    assert stored(items) == {it.key: members[it.locator[2]] for it in items}


def test_tar_written_with_webdataset(tmp_path):
    import webdataset as wds

    shard = tmp_path / "wds-000.tar"
    images = {f"sample{i:03d}": encode("PNG", size=(40, 40), seed=i) for i in range(5)}
    with wds.TarWriter(str(shard)) as sink:
        for key, data in images.items():
            sink.write({"__key__": key, "png": data, "cls": b"1"})
    items = list_source(shard)
    assert [it.key for it in items] == sorted(images)
    assert stored(items) == images


def test_tar_key_with_two_image_extensions_is_a_duplicate(tmp_path):
    import webdataset as wds

    shard = tmp_path / "dup.tar"
    with wds.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "k", "jpg": encode("JPEG"), "png": encode("PNG")})
    with pytest.raises(SakError, match=r"duplicate key 'k' from .*dup\.tar:k\.jpg and .*dup\.tar:k\.png"):
        list_source(shard)


def test_tar_directory_glob_and_brace_pattern(tmp_path):
    for i in range(4):
        make_tar(tmp_path / f"shards/train-{i:03d}.tar", {f"s{i}.jpg": encode("JPEG", seed=i)})
    expect = ["s0", "s1", "s2", "s3"]
    assert [it.key for it in list_source(tmp_path / "shards")] == expect
    assert [it.key for it in list_source(f"{tmp_path}/shards/*.tar")] == expect
    assert [it.key for it in list_source(f"{tmp_path}/shards/train-{{001..002}}.tar")] == ["s1", "s2"]
    with pytest.raises(SakError, match=r"train-004\.tar .*does not exist"):
        list_source(f"{tmp_path}/shards/train-{{000..004}}.tar")
    with pytest.raises(SakError, match="matches no files"):
        list_source(f"{tmp_path}/shards/*.parquet")


def test_same_key_in_two_shards_is_a_duplicate(tmp_path):
    make_tar(tmp_path / "shards/0.tar", {"k.jpg": encode("JPEG")})
    make_tar(tmp_path / "shards/1.tar", {"k.png": encode("PNG")})
    with pytest.raises(SakError, match=r"duplicate key 'k' from .*0\.tar:k\.jpg and .*1\.tar:k\.png"):
        list_source(tmp_path / "shards")


def test_tar_unsafe_members_are_refused_never_extracted(tmp_path, caplog):
    good = encode("JPEG")
    shard = tmp_path / "work/evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add_member(tar, "../evil.jpg", good)
        add_member(tar, "/abs.jpg", good)
        add_member(tar, "a/../../up.jpg", good)
        add_member(tar, "link.jpg", b"", tarfile.SYMTYPE, "/etc/passwd")
        add_member(tar, "hard.jpg", b"", tarfile.LNKTYPE, "ok.jpg")
        add_member(tar, "dev.jpg", b"", tarfile.CHRTYPE)
        add_member(tar, "ok.jpg", good)
    with caplog.at_level(logging.WARNING, logger=tars.__name__):
        items = list_source(shard)
    assert [it.key for it in items] == ["ok"]
    refused = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("../evil.jpg", "/abs.jpg", "a/../../up.jpg", "link.jpg", "hard.jpg", "dev.jpg"):
        assert f"evil.tar:{name}:" in refused
    assert stored(items) == {"ok": good}
    assert not (tmp_path / "evil.jpg").exists() and not Path("/abs.jpg").exists()


def test_unreadable_tar(tmp_path):
    write(tmp_path / "junk.tar", b"this is not a tar archive at all" * 40)
    with pytest.raises(SakError, match=r"cannot read tar .*junk\.tar"):
        list_source(tmp_path / "junk.tar")
    gz = tmp_path / "gz.tar"
    with tarfile.open(gz, "w:gz") as tar:  # compressed shards have no seekable member offsets
        add_member(tar, "a.jpg", encode("JPEG"))
    with pytest.raises(SakError, match=r"cannot read tar .*plain \(uncompressed\)"):
        list_source(gz)
    whole = make_tar(
        tmp_path / "cut.tar", {"a.jpg": encode("JPEG", size=(300, 300)), "b.jpg": encode("JPEG")}
    )
    write(tmp_path / "cut2.tar", whole.read_bytes()[:2048])
    with pytest.raises(SakError, match="cannot read tar"):
        list_source(tmp_path / "cut2.tar")


# ----------------------------------------------------------------------------- parquet


def test_parquet_binary_column_default_keys_and_sniffed_ext(tmp_path):
    blobs = [encode("JPEG"), encode("PNG"), encode("WEBP"), b"GIF89a...", None]
    table = pa.table({"image": pa.array(blobs, pa.binary()), "label": [0, 1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=2)
    items = list_source(tmp_path / "data.parquet")  # the null row is skipped
    assert [(it.key, it.ext) for it in items] == [
        ("data/00000000", "jpg"),
        ("data/00000001", "png"),
        ("data/00000002", "webp"),
        ("data/00000003", "bin"),
    ]
    assert items[3].origin == f"{tmp_path / 'data.parquet'}:row 3"
    assert items[3].locator == ("parquet", str(tmp_path / "data.parquet"), 1, 1, "image")
    assert [data for _, data in read_bytes(items)] == blobs[:4]


def test_parquet_hf_struct_column_with_key_column(tmp_path):
    blobs = [encode("PNG", size=(32, 32), seed=i) for i in range(5)]
    image = pa.array([{"bytes": b, "path": f"x{i}.png"} for i, b in enumerate(blobs)])
    paths = ["train/cat.01.jpg", "train/dog.JPEG", "b.png", "a", "c.tar"]
    pq.write_table(pa.table({"image": image, "path": paths}), tmp_path / "hf.parquet", row_group_size=2)
    items = list_source(tmp_path / "hf.parquet")
    assert [it.key for it in items] == ["a", "b", "c_tar", "train/cat_01", "train/dog"]
    assert stored(items) == {
        "train/cat_01": blobs[0],
        "train/dog": blobs[1],
        "b": blobs[2],
        "a": blobs[3],
        "c_tar": blobs[4],
    }


def test_parquet_explicit_columns_and_errors(tmp_path):
    blob = encode("PNG", size=(32, 32))
    table = pa.table({"img": [blob, blob], "mask": [blob, blob], "uid": [7, 9], "caption": ["x", "y"]})
    pq.write_table(table, tmp_path / "two.parquet")
    with pytest.raises(
        SakError, match=r"several image-bytes columns \(columns: img: binary, mask: binary, uid"
    ):
        list_source(tmp_path / "two.parquet")
    items = list_source(tmp_path / "two.parquet", image_column="mask", key_column="uid")
    assert [(it.key, it.locator[-1]) for it in items] == [("7", "mask"), ("9", "mask")]
    with pytest.raises(SakError, match=r"no image-bytes column 'caption' .*--image-column"):
        list_source(tmp_path / "two.parquet", image_column="caption")
    with pytest.raises(SakError, match=r"no string or integer column 'nope'"):
        list_source(tmp_path / "two.parquet", image_column="img", key_column="nope")
    pq.write_table(pa.table({"caption": ["x"], "n": [1]}), tmp_path / "text.parquet")
    with pytest.raises(SakError, match=r"no image-bytes column \(columns: caption: string, n: int64\)"):
        list_source(tmp_path / "text.parquet")


def write_parquet(path: Path, columns: dict, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, **kw)
    return path


def test_parquet_folder_keys_and_duplicates(tmp_path):
    blob = encode("PNG", size=(32, 32))
    write_parquet(tmp_path / "pq/train-0.parquet", {"image": [blob, blob]})
    write_parquet(tmp_path / "pq/val/0.parquet", {"image": [blob]})
    keys = [it.key for it in list_source(tmp_path / "pq")]
    assert keys == ["train-0/00000000", "train-0/00000001", "val/0/00000000"]
    write_parquet(tmp_path / "dup/a.parquet", {"image": [blob], "id": ["same"]})
    write_parquet(tmp_path / "dup/b.parquet", {"image": [blob], "id": ["same"]})
    with pytest.raises(
        SakError, match=r"duplicate key 'same' from .*a\.parquet:row 0 and .*b\.parquet:row 0"
    ):
        list_source(tmp_path / "dup")


# ----------------------------------------------------------------------------- read_bytes


def test_read_bytes_mixed_sources_in_given_order(tmp_path, monkeypatch):
    expected: dict[str, bytes] = {}
    for i in range(3):
        expected[f"f{i}"] = write(tmp_path / f"folder/f{i}.png", encode("PNG", seed=i)).read_bytes()
    members = {f"t{i}.jpg": encode("JPEG", seed=10 + i) for i in range(6)}
    make_tar(tmp_path / "a.tar", dict(list(members.items())[:3]))
    make_tar(tmp_path / "b.tar", dict(list(members.items())[3:]))
    expected |= {name.split(".")[0]: data for name, data in members.items()}
    blobs = [encode("WEBP", seed=20 + i) for i in range(7)]
    pq.write_table(pa.table({"image": blobs}), tmp_path / "p.parquet", row_group_size=3)
    expected |= {f"p/{i:08d}": b for i, b in enumerate(blobs)}

    items = (
        list_source(tmp_path / "folder")
        + list_source(f"{tmp_path}/*.tar")
        + list_source(tmp_path / "p.parquet")
    )
    random.Random(1).shuffle(items)

    reads = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or original(self, i, **kw)
    )
    out = list(read_bytes(items))
    assert [it for it, _ in out] == items
    assert {it.key: data for it, data in out} == expected
    assert sorted(reads) == [0, 1, 2]  # each needed row group read once, despite the shuffled order
    assert list(read_bytes([])) == []


def test_read_bytes_reports_vanished_files(tmp_path):
    write(tmp_path / "src/a.png", encode("PNG"))
    items = list_source(tmp_path / "src")
    (tmp_path / "src/a.png").unlink()
    with pytest.raises(SakError, match=r"a\.png vanished since it was listed"):
        list(read_bytes(items))
    shard = make_tar(tmp_path / "s.tar", {"a.jpg": encode("JPEG")})
    items = list_source(shard)
    shard.unlink()
    with pytest.raises(SakError, match="vanished"):
        list(read_bytes(items))


# ----------------------------------------------------------------------------- check_image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_check_image_accepts_good_images(fmt):
    assert check_image(encode(fmt, size=(64, 48))) == ImageInfo(64, 48, fmt)


def test_check_image_refuses_truncated_jpeg():
    data = encode("JPEG", size=(256, 256), quality=95)
    with pytest.raises(BadImage, match="truncated or corrupt image data"):
        check_image(data[: len(data) // 2])
    progressive = encode("JPEG", size=(256, 256), progressive=True)
    with pytest.raises(BadImage, match="truncated or corrupt image data"):
        check_image(progressive[: len(progressive) // 2])


def test_check_image_refuses_truncated_png_and_webp():
    for fmt in ("PNG", "WEBP"):
        data = encode(fmt, size=(128, 128))
        with pytest.raises(BadImage, match=r"truncated|not a decodable"):
            check_image(data[: len(data) // 2])


def test_check_image_refuses_empty_text_and_tiny(tmp_path):
    with pytest.raises(BadImage, match="^empty file$"):
        check_image(b"")
    text = write(tmp_path / "fake.jpg", b"hello, I am a text file\n").read_bytes()
    with pytest.raises(BadImage, match=r"^not a decodable image \(cannot identify image file\)$"):
        check_image(text)
    with pytest.raises(BadImage, match=r"^too small: 1x1, the shorter side must be >= 32 px$"):
        check_image(encode("PNG", size=(1, 1)))
    assert check_image(encode("PNG", size=(1, 1)), min_side=1) == ImageInfo(1, 1, "PNG")


def test_check_image_refuses_decompression_bomb_fast():
    bomb = png_header_only(50_000, 50_000)
    assert len(bomb) < 200
    start = time.perf_counter()
    with pytest.raises(BadImage, match=r"^too many pixels: 50000x50000 > max_pixels=178956970$"):
        check_image(bomb)
    with pytest.raises(BadImage, match="too many pixels: 50000x50000"):
        decode_rgb(bomb)
    assert time.perf_counter() - start < 1.0  # decoding 2.5 Gpx would take far longer (and 2.5 GB)


def test_own_pixel_limit_and_no_pil_warning_leak():
    with pytest.raises(BadImage, match=r"^too many pixels: 100x100 > max_pixels=5000$"):
        check_image(encode("PNG", size=(100, 100)), max_pixels=5000)
    # 10000 x 9000 is above PIL's warning threshold but within our default limit: no warning
    # escapes, and the (truncated) pixel data is what gets refused
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImage, match="truncated or corrupt"):
            check_image(png_header_only(10_000, 9_000), max_decode_ratio=float("inf"))


def test_check_image_raises_only_bad_image_on_corrupt_bytes():
    """Fuzz: random byte flips and cuts. Whatever happens, only BadImage escapes; and inputs that are
    corrupt for certain (cut well before the end of the data, or with the format's signature broken)
    are refused, with the reason the user will read. A flip inside pixel data may still decode (JPEG
    and WebP carry no checksums), so flipped inputs are only held to the first rule."""
    rng = random.Random(0)
    refused = {"cut": 0, "signature": 0}
    for fmt in ("JPEG", "PNG", "WEBP"):
        good = encode(fmt, size=(48, 48))
        check_image(good)  # the uncorrupted input is accepted
        for _ in range(40):
            data = bytearray(good)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randint(1, len(data))] if rng.random() < 0.3 else data)
            try:
                check_image(data)
                decode_rgb(data)
            except BadImage:
                pass
        for _ in range(15):  # cut: the trailing 32 bytes hold at most end markers, never needed pixels
            cut = good[: rng.randint(1, len(good) - 32)]
            with pytest.raises(BadImage, match=r"truncated or corrupt image data|not a decodable image"):
                check_image(cut)
            with pytest.raises(BadImage, match=r"truncated or corrupt image data|not a decodable image"):
                decode_rgb(cut)
            refused["cut"] += 1
        for _ in range(5):  # a broken signature: no decoder recognises the file
            data = bytearray(good)
            data[rng.randrange(4)] ^= 0xFF
            with pytest.raises(BadImage, match="not a decodable image"):
                check_image(bytes(data))
            refused["signature"] += 1
    assert refused == {"cut": 45, "signature": 15}


# ----------------------------------------------------------------------------- decode_rgb


def test_decode_rgb_modes():
    grey = Image.new("L", (40, 40), 77)
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # transparent pixel -> white
    cases = {
        "L": (grey, "PNG", (77, 77, 77)),
        "P": (palette, "PNG", (10, 200, 30)),
        "RGBA": (rgba, "PNG", (255, 0, 0)),
        "CMYK": (Image.new("CMYK", (40, 40), (0, 0, 0, 0)), "JPEG", (255, 255, 255)),
        "I;16": (Image.fromarray(np.full((40, 40), 32896, np.uint16)), "PNG", (128, 128, 128)),
    }
    for mode, (im, fmt, colour) in cases.items():
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out = decode_rgb(buf.getvalue())
        assert out.mode == "RGB" and out.size == (40, 40), mode
        assert np.abs(np.asarray(out)[20, 20].astype(int) - colour).max() <= 2, mode
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert decode_rgb(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)


def test_decode_rgb_palette_with_transparency_and_la():
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([1, 2, 3, 200, 100, 50] + [0] * 762)
    palette.putpixel((5, 5), 1)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    out = decode_rgb(buf.getvalue())
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (200, 100, 50)
    buf = io.BytesIO()
    Image.new("LA", (32, 32), (90, 255)).save(buf, format="PNG")
    assert decode_rgb(buf.getvalue()).getpixel((3, 3)) == (90, 90, 90)


def test_decode_rgb_keeps_stored_orientation():
    im = Image.new("RGB", (80, 40), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": must NOT be applied
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    assert decode_rgb(buf.getvalue()).size == (80, 40)
    assert check_image(buf.getvalue()) == ImageInfo(80, 40, "JPEG", orientation=6)  # reported, not applied


def test_decode_rgb_refuses_bad_bytes():
    with pytest.raises(BadImage, match="empty file"):
        decode_rgb(b"")
    data = encode("JPEG", size=(128, 128))
    with pytest.raises(BadImage, match="truncated"):
        decode_rgb(data[: len(data) // 2])


def test_a_file_name_that_is_not_utf8_is_listed_with_text_that_encodes(tmp_path):
    """Issue 21 item 9: a non-UTF-8 name (a latin-1 'é') must not kill the run when keys are stored."""
    import shutil

    from sak.pipeline.sources.listing import list_source

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (40, 40)).save(folder / "ok.png")
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(folder / "ok.png", folder / name)
    items = list_source(str(folder))
    keys = sorted(it.key for it in items)
    assert keys == ["caf%E9", "ok"]
    for it in items:
        it.key.encode("utf-8"), it.origin.encode("utf-8")  # what parquet and JSON need


def test_a_tar_member_name_that_is_not_utf8_is_listed_with_text_that_encodes(tmp_path):
    """A WebDataset shard written with latin-1 member names: the key and the origin (stored in the skipped
    list and printed) encode as UTF-8, and the member's bytes are read back by its original name."""
    import tarfile

    from sak.pipeline.sources.listing import list_source, read_bytes

    buf = io.BytesIO()
    Image.new("RGB", (40, 40)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        info = tarfile.TarInfo("caf\xe9.png")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    (item,) = list_source(str(tmp_path / "s.tar"))
    assert item.key == "caf%E9" and item.origin.endswith("s.tar:caf%E9.png")
    item.origin.encode("utf-8")
    ((_, data),) = list(read_bytes([item]))
    assert data == buf.getvalue()
