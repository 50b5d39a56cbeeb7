"""Ray start-up (embedded local by default, a cluster via --address) and progress reporting."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

from sak.pipeline.base.errors import SakError

log = logging.getLogger("sak")


@contextlib.contextmanager
def heartbeat(what: str, every: float = 5.0) -> Iterator[None]:
    """A log line `what (Ns)` every `every` seconds while a blocking call runs (Ray's start, a teacher's
    load): long work is never silent, whether or not the output is a terminal."""
    stop, t0 = threading.Event(), time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            log.info(f"{what} ({time.monotonic() - t0:.0f}s)")

    thread = threading.Thread(target=beat, name="sak-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _token_auth_default_note(record: logging.LogRecord) -> bool:
    """Drop Ray's "token authentication is enabled" note (its default, nothing to act on); keep the rest,
    such as its warning that auth is disabled."""
    return "Token authentication is enabled" not in record.getMessage()


@contextlib.contextmanager
def ray_session(address: str | None, num_cpus: int | None, object_store_mb: int) -> Iterator[None]:
    """Use a running Ray if this process already has one; else start one and stop it afterwards.

    Embedded mode: a bounded object store (small machines otherwise reserve 30% of RAM) and no dashboard.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own variable, as `ray` reads it
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:  # "local": a new embedded Ray, never a cluster that a `ray start` left behind
        kwargs["address"] = "local"
        # Ray notes on every embedded start that its default token auth is on: nothing to act on, dropped
        logging.getLogger(RAY_AUTH_LOGGER).addFilter(_token_auth_default_note)
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 1
        kwargs["object_store_memory"] = object_store_mb * 1024 * 1024
    log.info(
        f"starting Ray: {'the cluster at ' + address if address else 'embedded, ' + str(kwargs['num_cpus']) + ' CPU(s)'}"
    )
    try:
        with heartbeat("still starting Ray"):
            ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise SakError(
            f"could not start {where}: {str(e).splitlines()[0]}; check --address and that Ray runs"
        ) from e
    try:
        yield
    finally:
        ray.shutdown()


class Progress:
    """A tqdm bar with rate and ETA on a terminal; otherwise one log line every `every` seconds."""

    def __init__(self, total: int, unit: str, desc: str, every: float = 5.0, enabled: bool = True) -> None:
        self.total, self.unit, self.desc, self.every = total, unit, desc, every
        self.count = 0
        self.t0 = self.last = time.monotonic()
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.every or self.count >= self.total):
            self.last = now
            rate = self.count / max(now - self.t0, 1e-9)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            log.info(
                f"{self.desc}: {self.count}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, ETA {eta:.0f}s)"
            )

    def tick(self, status: str) -> None:
        """Say what is happening when nothing landed for `every` seconds (teachers loading, a first shard
        on its way): never silent for long, on a terminal (the bar's postfix) or not (a log line)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=True)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            log.info(f"{self.desc}: {self.count}/{self.total} {self.unit}; {status} ({now - self.t0:.0f}s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    @property
    def rate(self) -> float:
        return self.count / max(time.monotonic() - self.t0, 1e-9)
