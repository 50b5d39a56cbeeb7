"""pipeline/actors.py, the actor pool of `sak-cache run` and `sak-cache stage2`, on the session's Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from sak.pipeline.actors import (
    ActorPool,
    actor_placement,
    shard_failure_error,
    start_actors,
    stop_actors,
)
from sak.pipeline.errors import SakError


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
