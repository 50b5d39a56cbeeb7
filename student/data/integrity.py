"""Integrity of what the loader reads: every file behind a teacher shard is checked before its first read.

A corrupted or tampered cache must be caught before it silently trains a bad model. `ShardIntegrity`
compares the sha256 of a shard's store files and image tars with the manifests, once per file per
process, in the loader worker that is about to read them; `--skip-bad-shards` asks it for every damaged
shard up front so that all ranks and workers leave out the same ones.
"""

from __future__ import annotations

from pathlib import Path

from sak.pipeline.errors import SakError
from sak.pipeline.provenance import sha256_file
from sak.student.data.index import CacheIndex


class ShardIntegrity:
    """The sha256 of every file a teacher shard's samples come from, checked before it is first read.

    A shard's files: each selected store's shard files (store manifest `shards[i].files`, when targets
    are read) and the image tars holding its images (cache.json `images.shards[j].sha256`). Each file is
    hashed once per process and the verdict kept, in the process that reads it (a loader worker), so
    startup stays cheap. Hashing runs at ~1 GB/s per core and the file is about to be read anyway.
    """

    def __init__(self, index: CacheIndex, with_targets: bool = True) -> None:
        self.index, self.with_targets = index, with_targets
        self._tars = {t.index: t for t in index.cache.images.shards}
        self._shard_files = {  # fingerprint -> {shard: {relpath: sha256}}
            s.fingerprint: {r.index: r.files for r in s.manifest.shards} for s in index.stores
        }
        self._verdicts: dict[Path, str | None] = {}  # file -> problem (None: intact)
        self._shards: dict[int, list[str]] = {}  # shard -> problems

    def shard_rows(self, shard: int) -> range:
        return range(
            shard * self.index.shard_size, min((shard + 1) * self.index.shard_size, self.index.num_views)
        )

    def _file(self, path: Path, digest: str | None) -> str | None:
        if path not in self._verdicts:
            if digest is None:
                self._verdicts[path] = "has no recorded sha256"
            elif not path.is_file():
                self._verdicts[path] = "is missing"
            else:
                ok = sha256_file(path) == digest  # ~1 GB/s; the reader is about to read the file anyway
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
            problem = self._file(idx.root / rel, entry.sha256 if entry else None)
            if problem:
                found.append(f"image tar {rel} (images/ shard {tar}) {problem}")
        for store in idx.stores if self.with_targets else []:
            files = self._shard_files[store.fingerprint].get(shard)
            if files is None:
                found.append(f"store {store.teacher} ({store.fingerprint}) has no record of shard {shard}")
                continue
            for rel, digest in sorted(files.items()):
                problem = self._file(store.path / rel, digest)
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
