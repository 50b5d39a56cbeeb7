"""`sak-cache verify / inspect / ls`: check a cache against its manifests, and describe caches.

verify recomputes every checksum and count: image tars, views.parquet, every shard file of every teacher
store, and that all stores describe the same views in the same order (same views.parquet digest, dataset
fingerprint, view count and shard boundaries). Each problem names the exact file and shard.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from sak.pipeline.errors import SakError
from sak.pipeline.manifest import CACHE_FILE, STORE_MANIFEST, read_cache, read_store_manifest
from sak.pipeline.provenance import sha256_file


def verify_cache(cache_dir: str | Path, progress=None) -> list[str]:
    """All problems found (empty list: the cache is intact)."""
    root = Path(cache_dir)
    cache = read_cache(root)
    problems: list[str] = []

    def check_file(rel: str, digest: str, what: str) -> bool:
        path = root / rel
        if not path.is_file():
            problems.append(f"{what}: file {rel} is missing")
            return False
        if sha256_file(path) != digest:
            problems.append(f"{what}: file {rel} does not match its recorded sha256 (corrupted or modified)")
            return False
        return True

    for tar in cache["images"]["shards"]:
        check_file(tar["file"], tar["sha256"], f"image shard {tar['index']}")
    if check_file(cache["views"]["file"], cache["views"]["sha256"], "views table"):
        n = pq.read_metadata(root / cache["views"]["file"]).num_rows
        if n != cache["num_views"]:
            problems.append(f"views table: {n} rows, cache.json says {cache['num_views']} views")
    n_images = sum(t["count"] for t in cache["images"]["shards"])
    if n_images != cache["dataset"]["num_images"]:
        problems.append(
            f"images: tars hold {n_images} images, cache.json says {cache['dataset']['num_images']}"
        )

    for fp, entry in cache["stores"].items():
        problems += _verify_store(root, cache, fp, entry, progress)
    return problems


def _verify_store(root: Path, cache: dict, fp: str, entry: dict, progress) -> list[str]:
    import zarr

    problems: list[str] = []
    where = f"store {entry['teacher']} ({fp})"
    store_dir = root / entry["path"]
    manifest_path = store_dir / STORE_MANIFEST
    if not manifest_path.is_file():
        return [f"{where}: manifest {entry['path']}/{STORE_MANIFEST} is missing"]
    if entry.get("manifest_sha256") and sha256_file(manifest_path) != entry["manifest_sha256"]:
        problems.append(
            f"{where}: {entry['path']}/{STORE_MANIFEST} was modified after the run that wrote it "
            f"(its sha256 differs from cache.json)"
        )
    try:
        m = read_store_manifest(store_dir)
    except SakError as e:
        return [*problems, f"{where}: {e}"]
    for field, expected in (
        ("views_sha256", cache["views"]["sha256"]),
        ("num_views", cache["num_views"]),
        ("shard_size", cache["shard_size"]),
        ("dataset_fingerprint", cache["dataset"]["fingerprint"]),
        ("fingerprint", fp),
    ):
        if m[field] != expected:
            problems.append(
                f"{where}: manifest field {field!r} is {m[field]!r}, the cache has {expected!r} "
                f"(the store does not describe this cache's views)"
            )
    if m.get("format", "zarr") == "wds":
        problems += _verify_wds_layout(store_dir, m, where)
    for level in m["levels"] if m.get("format", "zarr") == "zarr" else []:
        for key, shape_key in (("array", "shape"), ("scales", "scales_shape")):
            if key not in level:
                continue
            try:
                arr = zarr.open_array(str(store_dir / level[key]), mode="r")
            except Exception as e:  # noqa: BLE001 - any failure to open is a finding, not a crash
                problems.append(f"{where}: array {level[key]} cannot be opened ({type(e).__name__})")
                continue
            if list(arr.shape) != level[shape_key]:
                problems.append(
                    f"{where}: array {level[key]} has shape {list(arr.shape)}, manifest says {level[shape_key]}"
                )
    seen: dict[int, int] = {}
    for shard in m["shards"]:
        s = shard["index"]
        seen[s] = seen.get(s, 0) + 1
        expected = (s * m["shard_size"], min((s + 1) * m["shard_size"], m["num_views"]))
        if (shard["start"], shard["stop"]) != expected:
            problems.append(
                f"{where}: shard {s} covers rows {shard['start']}..{shard['stop']}, expected {expected}"
            )
        for rel, digest in shard["files"].items():
            path = store_dir / rel
            if not path.is_file():
                problems.append(f"{where}: shard {s}: file {rel} is missing")
            elif sha256_file(path) != digest:
                problems.append(f"{where}: shard {s}: file {rel} does not match its recorded sha256")
        if progress:
            progress(1)
    dupes = sorted(s for s, c in seen.items() if c > 1)
    if dupes:
        problems.append(f"{where}: shard(s) {dupes} recorded more than once")
    missing = sorted(set(range(cache["num_shards"])) - set(seen))
    if missing:
        head = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        problems.append(
            f"{where}: {len(missing)} of {cache['num_shards']} shard(s) not done ({head}); "
            f"re-run `sak-cache run` to finish"
        )
    return problems


def _verify_wds_layout(store_dir: Path, m: dict, where: str) -> list[str]:
    """WebDataset store: every done shard's tar holds this cache's sample keys in order with every
    member (headers only; the sha256 check covers the bytes)."""
    from sak.pipeline.store.wds import WdsTeacherStore

    store = WdsTeacherStore(store_dir, m["codec"], m["shard_size"])
    blocks = [lv["block"] for lv in m["levels"]]
    problems = []
    for shard in m["shards"]:
        problems += [
            f"{where}: shard {shard['index']}: {p}" for p in store.check_shard(shard["index"], blocks)
        ]
    return problems


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_cache(cache_dir: str | Path) -> str:
    """The `inspect` text: dataset, plan, images and one row per teacher store, random-init flagged."""
    root = Path(cache_dir)
    cache = read_cache(root)
    ds, plan = cache["dataset"], cache["view_plan"]
    img_bytes = sum(t["bytes"] for t in cache["images"]["shards"])
    lines = [
        f"cache    {root}  (schema {cache['schema_version']}, written by sak-cache {cache['code_version']})",
        f"source   {ds['source']}: {ds['num_images']} images used, {len(ds['skipped'])} skipped",
        f"views    {cache['num_views']} ({plan['views_per_image']} per image, {plan['size']}px, seed {plan['seed']}, "
        f"{plan['algorithm']}), {cache['num_shards']} shard(s) of {cache['shard_size']}",
        f"images   {len(cache['images']['shards'])} tar(s), {_human(img_bytes)}",
    ]
    for s in ds["skipped"][:20]:
        lines.append(f"  skipped {s['origin']}: {s['reason']}")
    header = f"{'teacher':<12} {'fingerprint':<26} {'levels':<14} {'shape (H,W,C)':<15} {'codec':<5} {'done':>9} {'bytes':>10} {'per view':>10}"
    lines += ["", header, "-" * len(header)]
    warnings = []
    for fp, entry in cache["stores"].items():
        store_dir = root / entry["path"]
        try:
            m = read_store_manifest(store_dir)
        except SakError as e:
            lines.append(f"{entry['teacher']:<12} {fp:<26} unreadable manifest: {e}")
            continue
        nbytes = _dir_bytes(store_dir)
        blocks = ",".join(str(lv["block"]) for lv in m["levels"])
        shape = "x".join(str(v) for v in m["levels"][0]["shape"][1:]) if m["levels"] else "-"
        done = f"{len(m['shards'])}/{cache['num_shards']}"
        codec = f"{m['codec']}/{m.get('format', 'zarr')}"  # e.g. fp16/zarr, int8/wds
        lines.append(
            f"{entry['teacher']:<12} {fp:<26} {blocks:<14} {shape:<15} {codec:<5} {done:>9} "
            f"{_human(nbytes):>10} {_human(nbytes / max(1, cache['num_views'])):>10}"
        )
        if m["weights"].get("random_init"):
            warnings.append(
                f"WARNING: {entry['teacher']} ({fp}) holds features of a RANDOM-INIT model "
                f"({m['weights']['id']}): not a real teacher, for tests only"
            )
    if not cache["stores"]:
        lines.append("(no teacher store yet)")
    return "\n".join(lines + ([""] + warnings if warnings else []))


def list_caches(root: str | Path) -> list[str]:
    """One line per cache found under a folder."""
    root = Path(root)
    if not root.exists():
        raise SakError(f"{root} does not exist; pass a folder that holds caches")
    lines = []
    for path in sorted(root.rglob(CACHE_FILE)):
        cache_dir = path.parent
        try:
            cache = read_cache(cache_dir)
        except SakError as e:
            lines.append(f"{cache_dir}  unreadable: {e}")
            continue
        teachers = []
        for entry in cache["stores"].values():
            flag = "" if entry.get("complete") else "(incomplete)"
            flag += "(random-init)" if entry.get("random_init") else ""
            teachers.append(entry["teacher"] + flag)
        lines.append(
            f"{cache_dir}  {cache['dataset']['num_images']} images, {cache['num_views']} views, "
            f"{_human(_dir_bytes(cache_dir))}, teachers: {', '.join(teachers) or '-'}"
        )
    return lines
