"""Options generated from config dataclasses (sak.cli.options): the type rules, defaults from the
dataclass, every option of every command teaches, and a recorded value is a default too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from sak.cli.cache import cli as cache_cli
from sak.cli.cache import main as cache_main
from sak.cli.options import OptionSet
from sak.cli.train import cli as train_cli
from sak.pipeline.base.errors import SakError
from sak.pipeline.extraction.config import ExtractConfig, with_recorded_defaults
from sak.pipeline.format.documents import read_cache


def _pair(text: str) -> tuple[str, str]:
    left, sep, right = text.partition("=")
    if not sep:
        raise SakError(f"--pair {text!r} must look like A=B")
    return left, right


@dataclass(frozen=True)
class Toy:
    name: str = field(metadata={"help": "A required name."})
    where: str | None = field(metadata={"help": "Optional, no default."})
    count: int = field(default=3, metadata={"help": "How many."})
    ratio: float | None = field(default=None, metadata={"help": "A ratio."})
    fast: bool = field(default=False, metadata={"help": "Go fast."})
    maybe: bool | None = field(default=None, metadata={"help": "Tri-state."})
    tags: tuple[str, ...] = field(default=(), metadata={"help": "Comma list."})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "A choice."})
    pairs: tuple[tuple[str, str], ...] = field(
        default=(), metadata={"help": "Repeatable A=B.", "multiple": True, "parse": _pair, "name": "pair"}
    )
    hidden: int = field(default=0, metadata={"cli": False})
    skipped: int = field(default=1, metadata={"help": "Excluded by the OptionSet."})


TOY = OptionSet(Toy, exclude=("skipped",), rename={"count": "n"})


@click.command()
@TOY
def toy(**opts):
    given = TOY.given(opts)
    cfg = TOY.build(Toy, opts)
    click.echo(repr((sorted(given), cfg)))


def _toy(*args):
    result = CliRunner().invoke(toy, list(args), standalone_mode=False, catch_exceptions=True)
    return result


def test_types_defaults_and_given():
    r = _toy("--name", "x")
    assert r.exception is None, r.output
    assert r.output.strip() == repr((["name"], Toy(name="x", where=None)))  # every other: the dataclass's
    r = _toy(
        "--name", "x", "--n", "5", "--ratio", "0.5", "--fast", "--no-maybe", "--tags", "a, b,,c",
        "--mode", "b", "--pair", "k=v", "--pair", "p=q", "--where", "here",
    )  # fmt: skip
    assert r.exception is None, r.output
    expect = Toy("x", "here", 5, 0.5, True, False, ("a", "b", "c"), "b", (("k", "v"), ("p", "q")))
    given = ["count", "fast", "maybe", "mode", "name", "pairs", "ratio", "tags", "where"]
    assert r.output.strip() == repr((given, expect))


def test_bad_values_and_help():
    assert isinstance(_toy().exception, click.MissingParameter)  # --name is required (no default)
    assert isinstance(_toy("--name", "x", "--mode", "c").exception, click.BadParameter)
    assert isinstance(_toy("--name", "x", "--pair", "kv").exception, SakError)
    out = CliRunner().invoke(toy, ["--help"]).output
    for text in ("--n INTEGER", "How many.  [default: 3]", "--fast / --no-fast", "--maybe / --no-maybe",
                 "[a|b]", "--pair", "Go fast.  [default: off]"):  # fmt: skip
        assert text in out, out
    assert "--hidden" not in out and "--skipped" not in out and "--count" not in out


def test_a_field_without_help_is_refused():
    @dataclass
    class NoHelp:
        x: int = 0

    with pytest.raises(TypeError, match="help"):
        OptionSet(NoHelp)
    with pytest.raises(TypeError, match="do not exist"):
        OptionSet(Toy, exclude=("nope",))


def _commands(group):
    return [(name, cmd) for name, cmd in group.commands.items()]


def _params(cmd):
    return cmd.get_params(click.Context(cmd))  # generated options included (GeneratedCommand)


@pytest.mark.parametrize("group", [cache_cli, train_cli], ids=["sak-cache", "sak-train"])
def test_every_option_of_every_command_teaches(group):
    for name, cmd in _commands(group):
        for p in _params(cmd):
            if isinstance(p, click.Option):
                assert p.help and len(p.help) > 8, f"{name} {p.opts} has no help"


def test_the_documented_option_names_stay():
    names = {name: {o for p in _params(cmd) for o in (*p.opts, *p.secondary_opts)} for name, cmd in
             _commands(train_cli)}  # fmt: skip
    assert {
        "--kernels",
        "--no-kernels",
        "--no-tensorboard",
        "--resume",
        "--debug",
        "--paper-teachers",
    } <= names["stage1"]
    assert {"--img-size", "--tasks", "--router", "--freeze-backbone"} <= names["stage2"]
    run = {o for p in _params(cache_cli.commands["run"]) for o in (*p.opts, *p.secondary_opts)}
    assert {"--no-progress", "--format", "--weights", "--random-init", "--views-per-image"} <= run
    est = {o for p in _params(cache_cli.commands["estimate"]) for o in p.opts}
    assert {"--json", "--gpu", "--levels", "--grid", "--format"} <= est


def test_a_recorded_value_is_a_default(tiny_caches, tmp_path, capsys):
    """`run --out CACHE --teachers T` on an existing cache takes its view plan and shard size (the tiny
    cache has K=2, 64 px, shards of 4: none the defaults); a value that disagrees is refused in one line."""
    cache = tiny_caches.copy(tmp_path / "c")
    before = read_cache(cache)
    assert (
        cache_main(["run", "--out", str(cache), "--teachers", "clip_tiny", "--levels", "-1", "--no-progress"])
        == 0
    )
    after = read_cache(cache)
    assert len(after.stores) == len(before.stores) + 1  # a new store (last level only) was added
    assert (after.view_plan, after.shard_size) == (before.view_plan, before.shard_size)
    capsys.readouterr()
    assert cache_main(["run", "--out", str(cache), "--teachers", "clip_tiny", "--size", "128"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "--size 64" in err[0] and "128" in err[0], err
    same = ExtractConfig(
        views_per_image=2, source=None, out=str(cache), teachers=("clip_tiny",), size=64
    )  # given, and agrees
    assert with_recorded_defaults(same, {"size"}) == dataclasses.replace(
        same, shard_size=4, views_per_image=2
    )
