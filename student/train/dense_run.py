"""What stage 2 and TIGER share around the run harness: the training images (checked on resume), the
batch stream, and where the teachers' maps come from.

    train_data(cfg, recorded)        DenseDataset of the split; a resumed run's --data-root must hold as
                                     many training images as the run trained on
    batch_stream(cfg, data, ...)     TrainSamples (replayable augmentation) -> DataLoader: steps start+1..
                                     of this rank's part of every global batch (the same samples, in the
                                     same order, as one process), its own generator (never the global RNG)
    stage2_cache_targets(cfg, ...)   a stage-2 target cache (`sak-cache stage2`) built for this run's
                                     dataset, images, seed, crop and augmentation
    cached_source / named_source     TIGER's experts from a stage-2 cache, or from teachers run live by name
    live_teachers(record, ...)       a TIGER run's teachers rebuilt from its record (for evaluation)
    run_instructions(cfg, ...)       TIGER's instruction embeddings: the run's on resume, else encoded once
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sak.pipeline.base.errors import SakError
from sak.pipeline.buckets.bucket import is_url
from sak.pipeline.format.records import WeightsRecord
from sak.student.data.dense import DenseDataset, TrainSamples, collate
from sak.student.data.loader import usable_workers
from sak.student.model.config import ExpertSpec
from sak.student.run.folder import RunFolder
from sak.student.run.record import Stage2Run, TeacherRef, TeacherSourceRecord, TigerRun
from sak.student.train.distributed import DistEnv, rank_positions
from sak.student.train.stage2_teachers import Stage2Teachers, load_stage1_run


def train_data(cfg: Any, recorded: Stage2Run | TigerRun | None) -> DenseDataset:
    """The training split; on resume it must be the run's (a moved --data-root is fine)."""
    data = DenseDataset(cfg.dataset, cfg.data_root, "train", cfg.tasks)
    if recorded is not None and len(data) != recorded.train_images:
        raise SakError(
            f"--resume {cfg.out}: --data-root {cfg.data_root} has {len(data)} training images, the run "
            f"trained on {recorded.train_images} (recorded root: {recorded.config.data_root})"
        )
    return data


def batch_stream(
    cfg: Any, data: DenseDataset, crop: tuple[int, int], start: int, env: DistEnv
) -> Iterator[dict]:
    """This rank's batches of steps start+1 .. cfg.steps."""
    loader = torch.utils.data.DataLoader(
        TrainSamples(data, crop, cfg.seed, cfg.scale_range, cfg.photometric),
        batch_size=cfg.batch_size // env.world_size,
        sampler=rank_positions(start, cfg.steps, cfg.batch_size, env),
        num_workers=usable_workers(cfg.num_workers),
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG
    )
    return iter(loader)


def stage2_cache_identity(cfg: Any, data: DenseDataset, crop: tuple[int, int]) -> dict[str, Any]:
    """What a stage-2 target cache must have been built with to serve this run (its identity fields)."""
    from sak.student.data.stage2_views import PLAN_VERSION, SPLIT, names_hash

    return {
        "dataset": cfg.dataset,
        "split": SPLIT,
        "num_images": len(data),
        "names_sha": names_hash(data.names),
        "seed": int(cfg.seed),
        "crop": list(crop),
        "scale_range": [float(x) for x in cfg.scale_range],
        "photometric": bool(cfg.photometric),
        "plan_version": PLAN_VERSION,
    }


def stage2_cache_targets(
    cfg: Any, data: DenseDataset, crop: tuple[int, int], fingerprints: list[str] | None = None
):
    """The stage-2 cache of --cache, checked to serve this run (and, for stage 2, its stage-1 stores)."""
    from sak.student.data.stage2_cache import Stage2CachedTargets

    expected = stage2_cache_identity(cfg, data, crop)
    if fingerprints is not None:
        expected["fingerprints"] = fingerprints
    return Stage2CachedTargets(cfg.cache, expected, cfg.steps, cfg.batch_size)


# ------------------------------------------------------------------------------------------ TIGER


def run_instructions(cfg: Any, folder: RunFolder, tasks: list[str], resume: bool):
    """(embeddings (T, text_dim), InstructionIdentity): read from the run when resuming, else the texts
    (defaults or --instructions) encoded once by the frozen open_clip text tower."""
    from sak.student.model.instructions import encode_instructions, instruction_texts

    if resume:
        return folder.load_instructions()
    texts = instruction_texts(tasks, cfg.instructions)
    pretrained = None if (cfg.text_pretrained or "").lower() in ("", "none") else cfg.text_pretrained
    return encode_instructions(texts, cfg.text_model, pretrained, cfg.seed)


@dataclass
class TeacherSource:
    """A callable giving {teacher: [(B, h, w, C)]} for a batch, the experts it yields, and its record."""

    fetch: Callable[[dict, torch.Tensor, torch.device], dict]  # (batch, images_u8, device) -> maps
    experts: list[ExpertSpec]
    record: TeacherSourceRecord  # what config.json keeps: enough to rebuild live teachers for evaluation


def _valid(teacher: str, crop: tuple[int, int]) -> tuple[float, float]:
    from sak.pipeline.teachers.specs import get_teacher

    if get_teacher(teacher).fixed_input is None:
        return (1.0, 1.0)
    side = max(crop)
    return (crop[0] / side, crop[1] / side)


def cached_source(cfg: Any, data: DenseDataset, crop: tuple[int, int]) -> TeacherSource:
    targets = stage2_cache_targets(cfg, data, crop)
    cache = targets.cache
    experts = [
        ExpertSpec(t.teacher, int(b), i, int(t.grids[i][2]), _valid(t.teacher, crop))
        for t in cache.teachers
        for i, b in enumerate(t.blocks)
    ]
    record = TeacherSourceRecord(
        source="cache",
        cache=cfg.cache if is_url(cfg.cache) else str(Path(cfg.cache).expanduser().resolve()),
        init=cache.init,
        teachers=[
            TeacherRef(
                teacher=t.teacher,
                fingerprint=t.stage1_fingerprint,
                weights=t.weights,
                seed=t.seed,
            )
            for t in cache.teachers
        ],
    )
    return TeacherSource(lambda batch, images, device: targets(batch, images, device), experts, record)


def named_source(cfg: Any, crop: tuple[int, int], device: torch.device) -> TeacherSource:
    teachers = Stage2Teachers.named(cfg.teachers, dict(cfg.weights), cfg.random_init, cfg.seed, crop, device)
    record = TeacherSourceRecord(
        source="named",
        init=None,
        teachers=[
            TeacherRef(
                teacher=s.teacher, fingerprint=s.fingerprint, weights=WeightsRecord(**s.weights), seed=s.seed
            )
            for s in teachers.stores
        ],
    )
    experts = [
        ExpertSpec(s.teacher, int(b), i, teachers.teachers[s.teacher].spec.dim, _valid(s.teacher, crop))
        for s in teachers.stores
        for i, b in enumerate(s.blocks)
    ]
    return TeacherSource(lambda batch, images, dev: teachers(images), experts, record)


def live_teachers(record: TeacherSourceRecord, crop: tuple[int, int], device: torch.device) -> Stage2Teachers:
    """Rebuild a run's teachers (for evaluation on images no cache holds); fingerprints must match."""
    if record.init:
        _, stage1 = load_stage1_run(record.init, device)
        teachers = Stage2Teachers(stage1, crop, device)
    else:
        ts = record.teachers
        files = {t.teacher: t.weights.path for t in ts if t.weights and t.weights.source == "file"}
        random_init = any(t.weights and t.weights.source == "random" for t in ts)
        seed = next((t.seed for t in ts if t.seed is not None), 0)
        teachers = Stage2Teachers.named([t.teacher for t in ts], files, random_init, seed, crop, device)
    have = [s.fingerprint for s in teachers.stores]
    want = [t.fingerprint for t in record.teachers]
    if have != want:
        raise SakError(f"the run's teachers cannot be rebuilt as they were: fingerprints {have} != {want}")
    return teachers
