"""A store's shard journal, `shards.jsonl`: one fsynced JSON line (a ShardRecord) per finished shard.

A shard counts as done only after its files are written, flushed and their sha256 recorded. Records go to
this append-only journal while extraction runs, so a crash costs at most the shards in flight; the store's
`manifest.json` is rewritten atomically from the journal when a run ends (and whenever a run resumes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.provenance import append_whole, open_append
from sak.pipeline.base.typed_json import from_json, to_json
from sak.pipeline.format.layout import JOURNAL
from sak.pipeline.format.records import ShardRecord
from sak.pipeline.format.schema import validate


def append_journal(store_dir: str | Path, record: ShardRecord) -> None:
    """One JSON line per completed shard; flushed and fsynced before the shard counts as done. A write that
    fails (a full disk) is cut back to the previous length and leaves as one line naming the journal."""
    path = Path(store_dir) / JOURNAL
    fd = open_append(path)
    try:
        append_whole(fd, (json.dumps(to_json(record), sort_keys=True) + "\n").encode(), path, sync=True)
    finally:
        os.close(fd)


def read_journal(store_dir: str | Path) -> dict[int, ShardRecord]:
    """Completed shards by index (the last record of a shard wins). A torn last line is ignored."""
    path = Path(store_dir) / JOURNAL
    done: dict[int, ShardRecord] = {}
    if not path.exists():
        return done
    try:
        lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError as e:
        raise SakError(f"{path} cannot be read ({e.strerror}); run `sak-cache verify`") from e
    for line in lines:
        try:
            data = json.loads(line)
            validate(data, ShardRecord, path)
        except (json.JSONDecodeError, SakError, RecursionError):
            continue  # a crash mid-append leaves at most one torn line; its shard is redone
        rec = from_json(ShardRecord, data)
        done[rec.shard] = rec
    return done
