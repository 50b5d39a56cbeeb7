"""pipeline/extraction/actors.py, the actor pool of `sak-cache run` and `sak-cache stage2`, on the session's Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from sak.pipeline.base.errors import SakError
from sak.pipeline.extraction.actors import (
    ActorPool,
    actor_placement,
    shard_failure_error,
    start_actors,
    stop_actors,
)


def _squarer() -> type:
    """A stand-in for a teacher worker: squares shard numbers; shard 3 fails as a bad file would.
    (Defined in a function so that Ray ships it by value: the workers cannot import this test module.)"""

    class Squarer:
        def __init__(self, offset: int) -> None:
            self.offset = offset

        def run(self, shard: int) -> int:
            if shard == 3:
                raise SakError(f"shard {shard}: image 7 cannot be decoded")
            return shard * shard + self.offset

    return Squarer


def test_placement_fits_the_cluster_and_the_jobs(ray_local):
    p = actor_placement(None, 10)  # 2 CPUs, no GPU: one actor per two CPUs
    assert (p.actors, p.gpus, p.threads) == (1, False, 1)
    assert actor_placement(3, 2).actors == 2  # never more actors than shards
    with pytest.raises(SakError, match="no GPU"):
        actor_placement(1, 4, use_gpus=True)


def test_pool_yields_every_result_then_the_failure_after_in_flight_shards_land(ray_local):
    placement = actor_placement(2, 6)
    actors = start_actors(_squarer(), placement, 100)
    try:
        got = {}
        pool = ActorPool(actors)
        with pytest.raises(Exception) as info:
            for job, result in pool.run([0, 1, 2, 3, 4, 5], lambda a, s: a.run.remote(s)):
                got[job] = result
        assert got and all(v == s * s + 100 for s, v in got.items()) and 3 not in got
        err = shard_failure_error(info.value, Path("/tmp/out"), len(got), "stage-2 cache build")
        assert "image 7 cannot be decoded" in str(err) and "already recorded are kept" in str(err)
        assert "\n" not in str(err)
        ok = dict(ActorPool(actors).run([0, 1, 2, 4], lambda a, s: a.run.remote(s)))
        assert ok == {s: s * s + 100 for s in (0, 1, 2, 4)}
    finally:
        stop_actors(actors)


def _doomed_worker() -> type:
    """A worker whose process dies on every call when it is the actor named in the file `doomed` (as on a
    node that went away: Ray restarts it, it dies again, then gives up); other actors compute."""

    class Doomed:
        def __init__(self, doomed: str) -> None:
            self.doomed = doomed

        def whoami(self) -> str:
            import ray

            return ray.get_runtime_context().get_actor_id()

        def run(self, shard: int) -> int:
            import os

            import ray

            if Path(self.doomed).read_text() == ray.get_runtime_context().get_actor_id():
                os._exit(1)
            return shard * shard

    return Doomed


def test_a_lost_actor_s_shards_go_to_the_live_one(ray_local, tmp_path):
    import ray

    doomed = tmp_path / "doomed"
    doomed.write_text("")
    actors = start_actors(_doomed_worker(), actor_placement(2, 6), str(doomed))
    try:
        doomed.write_text(ray.get(actors[0].whoami.remote()))
        pool = ActorPool(actors)
        got = dict(pool.run([0, 1, 2, 4, 5], lambda a, s: a.run.remote(s)))
        assert got == {s: s * s for s in (0, 1, 2, 4, 5)}
        assert pool.live.dead == {0} and pool.failure is None
    finally:
        stop_actors(actors)


def test_live_actors_bookkeeping():
    from sak.pipeline.extraction.actors import SHARD_RETRIES, LiveActors

    live = LiveActors(2)
    assert [live.idlest(), live.idlest(), live.idlest()] == [0, 1, 0]
    assert live.lose(0, "shard 7") and live.dead == {0}  # another actor lives: 0 is retired
    assert [live.idlest() for _ in range(3)] == [1, 1, 1]
    assert live.lose(1, "shard 8") and live.dead == {0}  # the last actor is kept (Ray restarts it)
    for _ in range(SHARD_RETRIES - 1):
        assert live.lose(1, "shard 7")
    assert not live.lose(1, "shard 7")  # retried too often


def test_only_failures_a_rerun_gets_past_say_re_run(ray_local):
    import errno

    import ray.exceptions as rx

    from sak.pipeline.extraction.actors import rerun_helps

    @ray_local.remote
    def raises(error: BaseException):
        raise error

    def raised(error: BaseException) -> BaseException:
        try:
            ray_local.get(raises.remote(error))
        except Exception as e:  # a RayTaskError wrapping `error`, as ray.get gives it to the driver
            return e
        raise AssertionError("no error")

    out = Path("/tmp/out")
    for lost in (rx.ActorDiedError(), rx.NodeDiedError("node gone"), rx.WorkerCrashedError(),
                 rx.ObjectLostError("00" * 28, "owner", "call site")):  # fmt: skip
        assert rerun_helps(lost), lost
        assert "re-run the same command" in str(shard_failure_error(lost, out, 2))
    assert rerun_helps(raised(ConnectionResetError("reset by peer")))  # a transient network error
    for error in (ValueError("bad shape\nsecond line"), RuntimeError("a bug"),
                  OSError(errno.ENOSPC, "No space left on device"), SakError("bad weights")):  # fmt: skip
        failure = raised(error)
        assert not rerun_helps(failure), error
        line = str(shard_failure_error(failure, out, 2))
        assert "re-run" not in line and "run again" not in line and "\n" not in line, line
    line = str(shard_failure_error(raised(ValueError("bad shape\nsecond line")), out, 2))
    assert (
        line
        == "extraction failed (ValueError: bad shape); see the log above (the 2 shard(s) already recorded are kept)"
    )


def _broken_worker() -> type:
    """A TeacherWorker whose teachers fail as a bug would (shipped by value: defined in a function)."""
    from sak.pipeline.extraction.worker import TeacherWorker

    class BrokenWorker(TeacherWorker):
        def _forward(self, name, views_u8, keep_native):
            raise ValueError(f"teacher {name} returned maps of the wrong rank (injected)")

    return BrokenWorker


def test_a_deterministic_actor_error_does_not_say_re_run(ray_local, photo_dir, tmp_path, monkeypatch, capsys):
    import sak.pipeline.extraction.driver as driver
    from sak.cli.cache import main as cache_main

    monkeypatch.setattr(driver, "TeacherWorker", _broken_worker())
    args = ["run", "--source", str(photo_dir), "--out", str(tmp_path / "c"), "--teachers", "clip_tiny",
            "--size", "64", "--views-per-image", "1", "--no-progress"]  # fmt: skip
    assert cache_main(args) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("sak-cache: error:")]
    assert len(lines) == 1 and "Traceback" not in lines[0], err
    assert "ValueError: teacher clip_tiny returned maps of the wrong rank (injected)" in lines[0]
    assert "see the log above" in lines[0] and "re-run" not in err and "run again" not in err
