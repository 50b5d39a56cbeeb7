"""A run folder: its files by name, its lock, its metrics log, and the instruction embeddings it keeps.

    RUN/config.json          the run record (record.py)             CONFIG_FILE
    RUN/metrics.jsonl        one JSON object per record line        METRICS_FILE
    RUN/tb/                  the same numbers for TensorBoard       TENSORBOARD_DIR
    RUN/checkpoint/          the latest checkpoint (checkpoint.py)  CHECKPOINT_DIR
    RUN/instructions.*       TIGER's instruction embeddings
    RUN/.sak-lock            held by the one trainer writing here (pipeline/lock.py, the cache's lock):
                             it names its holder (pid, host, command); a second trainer refuses naming it;
                             a dead holder's lock (flock released by the kernel) is taken over

metrics.jsonl is the one file left free-form (its keys are the numbers each trainer logs: `loss/<teacher>/
L<i>`, `repsim/<teacher>`, ...); every line is a JSON object with "kind" and "step". On resume the lines
after the checkpoint's step are dropped (they are trained again), and a torn last line (a write cut by a
kill or a full disk) is dropped with a warning instead of failing the resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.lock import LOCK_FILE, CacheLock
from sak.pipeline.base.provenance import append_whole, atomic_path, open_append
from sak.student.run.record import (
    InstructionsRecord,
    RunRecord,
    read_document,
    read_run_record,
    write_document,
)

log = logging.getLogger("sak")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
CHECKPOINT_DIR = "checkpoint"  # the one name of a run's checkpoint folder (every trainer)
INSTRUCTIONS_JSON = "instructions.json"
INSTRUCTIONS_TENSORS = "instructions.safetensors"
RUN_LOCK = LOCK_FILE


class RunFolder:
    """RUN/ of one training run, whichever trainer writes it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self._lock: CacheLock | None = None

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    def holds_run(self) -> bool:
        """A run was started here (its record or a checkpoint folder exists)."""
        return self.config_file.exists() or (self.path / CHECKPOINT_DIR).exists()

    # ------------------------------------------------------------------------------------------ lock

    def lock(self) -> None:
        """Take the run's lock (creating the folder), or refuse naming the trainer that holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = CacheLock(self.path, writer="trainer").acquire()

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ---------------------------------------------------------------------------------------- record

    def read_record(self) -> RunRecord:
        if not self.config_file.exists():
            raise SakError(f"{self.path} holds no run ({CONFIG_FILE} is missing)")
        return read_run_record(self.config_file)

    def write_record(self, record: RunRecord) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_document(self.config_file, record)

    def clear_for_restart(self) -> None:
        """Remove what a run without a checkpoint left (record, metrics, TensorBoard, instructions), so it
        starts again from step 0. Never called on a run that has a checkpoint."""
        for name in (CONFIG_FILE, METRICS_FILE, INSTRUCTIONS_JSON, INSTRUCTIONS_TENSORS):
            (self.path / name).unlink(missing_ok=True)
        for name in (TENSORBOARD_DIR, f"{CHECKPOINT_DIR}.tmp"):
            shutil.rmtree(self.path / name, ignore_errors=True)

    # -------------------------------------------------------------------------------------- metrics

    def metrics_lines(self) -> list[dict]:
        """The records of metrics.jsonl; a torn last line is left out (see `trim_metrics`)."""
        return _parse_metrics(self.metrics_file)[0]

    def trim_metrics(self, step: int) -> None:
        """Keep the records of steps up to `step` (the checkpoint's), dropping a torn last line; rewritten
        whole through a temporary file, so a crash here leaves the old file."""
        if not self.metrics_file.exists():
            return
        records, torn = _parse_metrics(self.metrics_file)
        if torn:
            log.warning(
                f"{self.metrics_file}: dropped a torn last line ({torn!r:.60}), left by an interrupted write"
            )
        kept = [r for r in records if int(r.get("step", 0)) <= step]
        with atomic_path(self.metrics_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def metrics_log(self, enabled: bool, tensorboard: bool) -> MetricsLog:
        return MetricsLog(self.path, enabled, tensorboard)

    # --------------------------------------------------------------------------------- instructions

    def save_instructions(self, emb, identity) -> None:
        """TIGER's instruction embeddings (T, text_dim) and the identity of their encoder."""
        from safetensors.torch import save_file

        from sak.pipeline.base.provenance import sha256_file

        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path / INSTRUCTIONS_TENSORS) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp))
        record = InstructionsRecord(
            **identity.to_dict(), embeddings_sha256=sha256_file(self.path / INSTRUCTIONS_TENSORS)
        )
        write_document(self.path / INSTRUCTIONS_JSON, record)

    def load_instructions(self):
        """(embeddings (T, text_dim), InstructionIdentity), checksum-verified."""
        from safetensors.torch import load_file

        from sak.pipeline.base.provenance import sha256_file

        record = read_document(self.path / INSTRUCTIONS_JSON, InstructionsRecord)
        if sha256_file(self.path / INSTRUCTIONS_TENSORS) != record.embeddings_sha256:
            raise SakError(f"{self.path / INSTRUCTIONS_TENSORS} does not match its recorded checksum")
        return load_file(str(self.path / INSTRUCTIONS_TENSORS))["embeddings"], record.identity


def _parse_metrics(path: Path) -> tuple[list[dict], str]:
    """(records, the torn last line or ""): a line that does not parse is refused unless it is the last."""
    if not path.exists():
        return [], ""
    lines = path.read_text(errors="replace").split("\n")
    records, torn = [], ""
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == last:
                torn = line
                continue
            raise SakError(
                f"{path}: line {i + 1} is not a JSON object (damaged in the middle, not a torn last line); "
                f"remove that line to resume"
            ) from None
        records.append(record)
    return records, torn


class MetricsLog:
    """One JSON line per record in RUN/metrics.jsonl, and the numbers to TensorBoard when installed.

    Each line is one os.write on an O_APPEND descriptor; a write that fails (a full disk) is cut back to
    the previous length, so no torn line stays, and leaves as one line naming the file (oserrors.py)."""

    def __init__(self, run: Path, enabled: bool, tensorboard: bool) -> None:
        self.fd: int | None = None
        self.tb = None
        if not enabled:
            return
        self.path = run / METRICS_FILE
        torn = self.path.exists() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        self.fd = open_append(self.path)
        if torn:  # a line cut by a kill: end it, so the next record starts a line of its own
            append_whole(self.fd, b"\n", self.path)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run / TENSORBOARD_DIR))
            except ImportError:
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if self.fd is None:
            return
        append_whole(self.fd, (json.dumps(record) + "\n").encode(), self.path)
        if self.tb is not None:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "kind"):
                    self.tb.add_scalar(prefix + k, v, record["step"])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
