"""The resume grammar of every trainer (stage 1, stage 2, TIGER): one set of flags, one set of rules.

    sak-train CMD --resume RUN [OPTIONS]      continue RUN from its checkpoint; the recorded options are
                                              the defaults, the options given are checked against them
    sak-train CMD --resume --out RUN ...      the same (the spelling stage 2 and TIGER had)
    sak-train CMD --out RUN --restart ...     start RUN again from step 0: only a run that has no
                                              checkpoint yet (stopped or killed before its first save)
    --stop-after N                            stop with a checkpoint after step N, this time only (a
                                              resumed run goes on to its end unless given one again)

How each option behaves on resume is said once, by its config field (metadata `on_resume`):

    (absent)  FIXED    what the run was trained with: a different value is refused in one line naming the
                       option, the recorded value and the given one
    MACHINE            a per-machine or reporting setting (workers, device, log / eval / checkpoint cadence,
                       local caches): the given value wins; the recorded one applies when none is given
    LENGTH             the training length (--steps, --epochs): may be extended, never below the steps the
                       run has done; giving one of several length options clears the others
    PATH               where an input lives (--cache, --init, --data-root): may move; the trainer checks
                       that what it finds there is what the run recorded (fingerprints, image counts)
    OUT                the run folder: RUN itself (restating it is fine)

Kept free of torch: the command line builds configs with it before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sak.pipeline.base.errors import SakError

FIXED, MACHINE, LENGTH, PATH, OUT = "fixed", "machine", "length", "path", "out"
C = TypeVar("C")


def on_resume(kind: str) -> dict[str, str]:
    """Field metadata: how the option behaves on resume (see the module docstring)."""
    if kind not in (FIXED, MACHINE, LENGTH, PATH, OUT):
        raise ValueError(f"unknown on_resume kind {kind!r}")
    return {"on_resume": kind}


@dataclass(frozen=True)
class RunCommand:
    """The options every trainer takes that are about this invocation, not about the run's config."""

    resume: str | None = field(
        default=None,
        metadata={
            "help": "Continue the run in RUN from its checkpoint: its recorded options are the defaults; "
            "per-machine settings and --steps/--epochs may change [RUN: --out when omitted].",
            "metavar": "RUN",
            "flag_value": "",
            "group": "run",
        },
    )
    restart: bool = field(
        default=False,
        metadata={
            "help": "Start the run in --out again from step 0; only a run without a checkpoint (stopped "
            "or killed before its first save).",
            "group": "run",
        },
    )
    stop_after: int | None = field(
        default=None,
        metadata={
            "help": "Stop with a checkpoint after this step, this time only (--resume continues).",
            "metavar": "STEP",
            "group": "run",
        },
    )

    def run_folder(self, out: str | None) -> str | None:
        """The folder --resume names: RUN, or --out for the flag form (refused when they differ)."""
        if self.resume is None:
            return None
        if self.resume == "":
            if not out:
                raise SakError(
                    "--resume without RUN continues the run in --out: give --resume RUN or --out RUN"
                )
            return out
        if out and Path(out).expanduser().resolve() != Path(self.resume).expanduser().resolve():
            raise SakError(
                f"--out {out} differs from --resume {self.resume}; a run continues in its own folder"
            )
        return self.resume


def option_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("name") or f.name).replace("_", "-")


def kind_of(f: dataclasses.Field) -> str:
    return f.metadata.get("on_resume", FIXED)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists compare alike, as a record stores them


def shown(value: Any) -> str:
    """A value as the command line spells it: 1e-3, a,b, on / off, none."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v) for v in value) or "(none)"
    return str(value)


def given_differences(recorded: Any, cfg: Any) -> dict[str, Any]:
    """{field: value} where `cfg` differs from `recorded` (the API's resume: a whole config given)."""
    return {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if _plain(getattr(cfg, f.name)) != _plain(getattr(recorded, f.name))
    }


def check_resumable(recorded: Any, given: Mapping[str, Any], run: str | Path) -> dict[str, tuple[Any, Any]]:
    """Refuse, in one line, a given option that a resumed run may not change; returns what changes
    ({field: (recorded, given)}), for the run record."""
    fields = {f.name: f for f in dataclasses.fields(recorded)}
    changed: dict[str, tuple[Any, Any]] = {}
    for name, value in given.items():
        f, old = fields[name], getattr(recorded, name)
        if _plain(value) == _plain(old):
            continue  # restating a recorded option
        kind = kind_of(f)
        if kind == OUT:
            if Path(str(value)).expanduser().resolve() == Path(str(run)).expanduser().resolve():
                continue
            raise SakError(
                f"{option_name(f)} {value} differs from --resume {run}; a run continues in its own folder"
            )
        if kind == FIXED:
            raise SakError(
                f"--resume {run}: {option_name(f)} {shown(value)} differs from the run's {shown(old)}; "
                f"leave it out or give the recorded value (per-machine settings and the length may change)"
            )
        changed[name] = (old, value)
    return changed


def resumed_config(recorded: C, given: Mapping[str, Any], run: str | Path) -> C:
    """The recorded config with the options given on the command line, by the rules above. Giving one
    length option (--steps) clears the others (--epochs) the run had."""
    check_resumable(recorded, given, run)
    values = dict(given)
    lengths = [f.name for f in dataclasses.fields(recorded) if kind_of(f) == LENGTH]
    if any(n in values for n in lengths):
        values.update({n: None for n in lengths if n not in values})
    values.update({f.name: str(run) for f in dataclasses.fields(recorded) if kind_of(f) == OUT})
    return dataclasses.replace(recorded, **values)


def check_length(total_steps: int, done: int, run: str | Path) -> None:
    """A resumed run's length may be extended, never cut below the steps it has done."""
    if total_steps < done:
        raise SakError(
            f"--resume {run}: the run has done {done} steps; a length of {total_steps} steps would end before "
            f"them (give --steps {done} or more)"
        )


def missing_required(cls: type, given: Mapping[str, Any]) -> list[str]:
    """Options the config cannot do without (fields with no default) that were not given."""
    return [
        option_name(f)
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in given
    ]
