"""Integrity of what the loader reads: every file behind a teacher shard is checked before its first read.

A corrupted or tampered cache must be caught before it silently trains a bad model. `ShardIntegrity`
compares a digest of a shard's store files and image tars with the manifests (xxh3-128 where the cache
records it, ~6 GB/s per core; sha256, ~0.9 GB/s, for older caches), once per file per process, in the loader worker that is about to read them; `--skip-bad-shards` asks it for every damaged
shard up front so that all ranks and workers leave out the same ones.
"""

from __future__ import annotations

from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import sha256_file, xxh3_file
from sak.student.data.index import CacheIndex


class ShardIntegrity:
    """The digest of every file a teacher shard's samples come from, checked before it is first read.

    A shard's files: each selected store's shard files (store manifest `shards[i].files`, when targets
    are read) and the image tars holding its images (cache.json `images.shards[j].sha256`). Each file is
    hashed once per process and the verdict kept, in the process that reads it (a loader worker), so
    startup stays cheap. The fast digest (xxh3-128) is checked where recorded: the file is about to be
    read anyway, and it costs a few % of decoding it. It catches damage, not a deliberate forgery (which
    would have to rewrite the manifests too); `sak-cache verify` checks the sha256 of every file.
    """

    def __init__(self, index: CacheIndex, with_targets: bool = True) -> None:
        self.index, self.with_targets = index, with_targets
        self._tars = {t.index: t for t in index.cache.images.shards}
        self._shard_files = {  # fingerprint -> {shard: {relpath: (sha256, xxh3 or None)}}
            s.fingerprint: {
                r.index: {rel: (d, (r.xxh3 or {}).get(rel)) for rel, d in r.files.items()}
                for r in s.manifest.shards
            }
            for s in index.stores
        }
        self._verdicts: dict[Path, str | None] = {}  # file -> problem (None: intact)
        self._shards: dict[int, list[str]] = {}  # shard -> problems

    def shard_rows(self, shard: int) -> range:
        return range(
            shard * self.index.shard_size, min((shard + 1) * self.index.shard_size, self.index.num_views)
        )

    def _file(self, path: Path, digest: str | None, fast: str | None = None) -> str | None:
        if path not in self._verdicts:
            if digest is None and fast is None:
                self._verdicts[path] = "has no recorded sha256"
            elif not path.is_file():
                self._verdicts[path] = "is missing"
            elif fast is not None:
                ok = xxh3_file(path) == fast
                self._verdicts[path] = None if ok else "does not match its recorded xxh3 (corrupted)"
            else:
                ok = sha256_file(path) == digest  # older caches: no fast digest recorded
                self._verdicts[path] = None if ok else "does not match its recorded sha256 (corrupted)"
        return self._verdicts[path]

    def problems(self, shard: int) -> list[str]:
        """What is wrong with one teacher shard's files ([] = intact); computed once per process."""
        if shard in self._shards:
            return self._shards[shard]
        idx, found = self.index, []
        rows = self.shard_rows(shard)
        images = range(rows.start // idx.views_per_image, rows.stop // idx.views_per_image)
        for tar in sorted({int(t) for t in idx.image_shard[images.start : images.stop]}):
            entry = self._tars.get(tar)
            rel = entry.file if entry else f"image tar {tar}"
            problem = self._file(
                idx.root / rel, entry.sha256 if entry else None, entry.xxh3 if entry else None
            )
            if problem:
                found.append(f"image tar {rel} (images/ shard {tar}) {problem}")
        sv = idx.cache.student_views
        raw = {r.index: r for r in sv.shards} if sv else {}
        if shard in raw:  # stored student views: read instead of the images when the sizes match
            problem = self._file(idx.root / raw[shard].file, raw[shard].sha256, raw[shard].xxh3)
            if problem:
                found.append(f"student views {raw[shard].file} {problem}")
        for store in idx.stores if self.with_targets else []:
            files = self._shard_files[store.fingerprint].get(shard)
            if files is None:
                found.append(f"store {store.teacher} ({store.fingerprint}) has no record of shard {shard}")
                continue
            for rel, (digest, fast) in sorted(files.items()):
                problem = self._file(store.path / rel, digest, fast)
                if problem:
                    found.append(f"store {store.teacher} ({store.fingerprint}): file {rel} {problem}")
        self._shards[shard] = found
        return found

    def check(self, shard: int) -> None:
        """Raise a SakError naming the shard, its bad files and the next step, if any file is bad."""
        found = self.problems(shard)
        if found:
            raise SakError(
                f"cache {self.index.root}: shard {shard} (rows {self.shard_rows(shard).start}.."
                f"{self.shard_rows(shard).stop - 1}) is damaged: {'; '.join(found)}. Nothing was trained on "
                f"it. Run `sak-cache verify {self.index.root}` and re-extract, or pass --skip-bad-shards "
                f"to train without its samples"
            )

    def bad_shards(self, shards) -> dict[int, list[str]]:
        """{shard: problems} of the damaged ones among `shards` (hashes every file they need)."""
        return {s: p for s in shards if (p := self.problems(int(s)))}
