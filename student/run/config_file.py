"""`sak-train CMD --config FILE`: a run's options from a file, as timm's `train.py --config` takes them.

FILE is a run's own RUN/config.json (its `config` is used; its `kind` must be this trainer's), or a JSON
or YAML file of the same shape: `{"config": {...}}` or the config's fields alone (`steps: 200`). The
fields present are the defaults of this run; every option given on the command line wins over them.
Kept free of torch, like the rest of the command-line path.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.typed_json import from_json, type_hints

TRAINER_KINDS = {
    "Stage1Config": "sak-stage1-run",
    "Stage2Config": "sak-stage2-run",
    "TigerConfig": "sak-tiger-run",
}


def _read(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as e:
        raise SakError(f"--config {path}: cannot be read ({e.strerror})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml  # PyYAML, installed with ray

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise SakError(
            f"--config {path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({e})"
        ) from None


def _config_part(data: Any, cls: type, path: Path) -> dict:
    if not isinstance(data, dict):
        raise SakError(f"--config {path}: expected a mapping of options, found {type(data).__name__}")
    kind = data.get("kind")
    expected = TRAINER_KINDS.get(cls.__name__)
    if kind is not None and kind != expected:
        raise SakError(
            f"--config {path} is a {kind!r} record; this trainer reads {expected!r} (or the options alone)"
        )
    part = data["config"] if "config" in data else data
    if not isinstance(part, dict):
        raise SakError(f"--config {path}: field 'config' should be a mapping of options")
    return part


def config_file_values(cls: type, path: str | Path) -> dict[str, Any]:
    """{field: value} of the config fields FILE gives, checked against the run schema's `cls` record."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    from sak.student.run.record import RUN_KINDS, RUN_SCHEMA, read_run_record

    path = Path(path).expanduser()
    data = _read(path)
    if (
        isinstance(data, dict)
        and data.get("kind") in RUN_KINDS
        and data.get("kind") == TRAINER_KINDS.get(cls.__name__)
    ):
        recorded = read_run_record(
            path
        ).config  # a run's own record, read (and upgraded) as --resume reads it
        return {f.name: getattr(recorded, f.name) for f in dataclasses.fields(recorded)}
    part = _config_part(data, cls, path)
    defs = RUN_SCHEMA.shipped()["$defs"]
    schema = {**defs[cls.__name__], "required": [], "$defs": defs}  # the fields given, each of its type
    error = best_match(Draft202012Validator(schema).iter_errors(part))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "(options)"
        raise SakError(f"--config {path}: {where}: {error.message}")
    hints = type_hints(cls)
    return {name: from_json(hints[name], value) for name, value in part.items()}
