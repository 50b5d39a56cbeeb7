"""`sak-cache run` honours RAY_ADDRESS (Ray's own variable) when --address is not given; --address wins;
neither: an embedded local Ray. What ray.init is asked is checked, not a cluster's start."""

from __future__ import annotations

import pytest
import ray

from sak.pipeline.extraction.runtime import ray_session


@pytest.fixture
def asked(monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    return calls


@pytest.mark.parametrize(
    "env, option, want",
    [("10.0.0.5:6379", None, "10.0.0.5:6379"), ("10.0.0.5:6379", "auto", "auto"), (None, None, "local")],
)
def test_the_address_ray_is_asked_for(env, option, want, asked, monkeypatch):
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    with ray_session(option, 2, 64):
        pass
    assert asked[0]["address"] == want
    assert ("num_cpus" in asked[0]) == (want == "local")  # a cluster's resources are its own


def test_every_ray_start_of_the_package_and_benches_goes_through_the_runtime_helper():
    """One place starts Ray (`ray_session`: embedded with address="local", or --address / RAY_ADDRESS), so
    no tool or bench joins a stale cluster that a `ray start` left in /tmp/ray/ray_current_cluster."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    helper = root / "pipeline" / "extraction" / "runtime.py"
    callers = [
        p.relative_to(root).as_posix()
        for folder in ("pipeline", "student", "cli", "kernels", "bench")
        for p in (root / folder).rglob("*.py")
        if p != helper and re.search(r"^[^#\n]*\bray\.init\(", p.read_text(), re.M)  # code, not comments
    ]
    assert callers == []
