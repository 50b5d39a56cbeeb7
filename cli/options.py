"""Click options generated from config dataclasses: every option is defined once, as a field.

A field of a config dataclass (ExtractConfig, EstimateConfig, Stage1Config, Stage2Config, ...) becomes
the option `--field-name`; its type, default and help come from the field itself:

    teachers: tuple[str, ...] = field(default=(), metadata={"help": "Comma list of teachers ..."})

To ADD AN OPTION: add the field, with a default and `metadata={"help": "one sentence that teaches"}`, to
the config dataclass the command builds. Nothing else: the command's `OptionSet` turns it into a click
option and `OptionSet.build` hands the parsed value to the dataclass. A field that is not an option says
`metadata={"cli": False}` (or the OptionSet lists it in `exclude`).

Type -> option:
    bool, bool | None        --name/--no-name (None: neither given, the config decides)
    int, float, str (| None) that click type
    Literal["a", "b"]        click.Choice(["a", "b"])
    tuple[str, ...]          a comma list, "a,b" -> ("a", "b")
    anything else            needs metadata["parse"]: a function str -> value (e.g. --img-size HxW)

metadata keys (all optional but "help"):
    help      the option's help text (required: `--help` must teach every option)
    name      the option's name without dashes, when it differs from the field's (use_kernels -> kernels)
    parse     str -> value, for types the table above does not cover; raise SakError on bad text
    multiple  repeatable option (values collected into a tuple, each through `parse`)
    choices   allowed values (instead of a Literal type)
    metavar   shown in --help
    required  the option must be given (default: required exactly when the field has no default)
    group     heading the option is listed under in --help (ordering: fields in declaration order)
    aliases   other spellings the option also accepts, without dashes (an older name kept working)
    flag_value  the option may also be given alone, as a flag: it then takes this value (`--resume`
              alone, or `--resume RUN`)
    cli       False: not an option

Every generated option has the click default None: a value not given on the command line stays out of
`OptionSet.given(...)`, so the dataclass default applies, or a recorded value (a resumed run, an existing
cache) can take its place. `--help` still shows the dataclass default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click

MISSING = dataclasses.MISSING


class GeneratedCommand(click.Command):
    """A click command whose options come from an OptionSet, generated the first time click needs them
    (parsing or --help), after any options declared with decorators."""

    def __init__(self, *args: Any, options: OptionSet, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option_set = options
        self._generated = False

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not self._generated:
            self.params = [*self.option_set.click_params(), *self.params]
            self._generated = True
        return super().get_params(ctx)


def split_list(text: str) -> tuple[str, ...]:
    """ "a, b,,c" -> ("a", "b", "c")."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True  # a union of several: needs metadata["parse"]
    return tp, False


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def _show(default: Any) -> str | bool:
    if default is MISSING or default is None or default == ():
        return False
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return str(default)


@dataclasses.dataclass(frozen=True)
class GeneratedOption:
    """One field turned into a click option, and how its text becomes the field's value."""

    field: str
    decls: tuple[str, ...]
    kwargs: dict
    parse: Callable[[Any], Any] | None
    group: str | None
    none_default: bool = False  # Optional and no dataclass default: None when not given

    def click_option(self) -> Callable:
        return click.option(*self.decls, self.field, **self.kwargs)


def field_option(f: dataclasses.Field, tp: Any, name: str | None = None) -> GeneratedOption:
    """The click option of one dataclass field (see the module docstring for the rules)."""
    meta = f.metadata
    if "help" not in meta:
        raise TypeError(f"field {f.name!r} has no metadata['help']: every option must teach")
    tp, optional = _unwrap_optional(tp)
    default = _default_of(f)
    opt = (name or meta.get("name") or f.name).replace("_", "-")
    aliases = tuple(f"--{a}" for a in meta.get("aliases", ()))
    shown = _show(default)
    help_text = meta["help"] + (f"  [default: {shown}]" if shown and "[default:" not in meta["help"] else "")
    kwargs: dict[str, Any] = {"help": help_text, "show_default": False}  # not given -> None (or ())
    kwargs["required"] = meta.get("required", default is MISSING)
    parse = meta.get("parse")
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if "flag_value" in meta:  # given alone it takes flag_value; given with a value, that value
        kwargs.update(is_flag=False, flag_value=meta["flag_value"])
    if tp is bool and parse is None:
        decls = (f"--{opt}/--no-{opt}",)
        kwargs["default"] = None  # neither flag given -> None, so the dataclass (or a record) decides
        return GeneratedOption(f.name, decls, kwargs, None, meta.get("group"))
    choices = meta.get("choices")
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
    if meta.get("multiple"):
        kwargs["multiple"] = True
        kwargs["type"] = str
    elif choices is not None:
        kwargs["type"] = click.Choice([str(c) for c in choices])
    elif parse is None and tp in (int, float, str):
        kwargs["type"] = tp
    elif parse is None and typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        if typing.get_args(tp)[0] is not str:
            raise TypeError(f"field {f.name!r}: give metadata['parse'] for {tp}")
        parse = split_list
        kwargs.setdefault("metavar", "A,B,...")
    elif parse is None:
        raise TypeError(f"field {f.name!r} of type {tp}: give metadata['parse'] (str -> value)")
    none_default = optional and default is MISSING
    if none_default and "required" not in meta:
        kwargs["required"] = False
    return GeneratedOption(f.name, (f"--{opt}", *aliases), kwargs, parse, meta.get("group"), none_default)


class OptionSet:
    """The options of one or more config dataclasses, for one command.

    classes: the dataclasses whose fields become options (later classes may not repeat a field), or
      zero-argument functions returning one: imported only when the options are first needed, so a
      command line that runs another command (`sak-cache verify`) does not import the heavy modules;
      use such an OptionSet with `@group.command(cls=GeneratedCommand, options=...)`.
    exclude: field names that are not options of this command. rename: field -> option name.
    required: field -> bool, overriding "required when no default" (e.g. --cache given by --resume).
    """

    def __init__(
        self,
        *classes: type,
        exclude: Iterable[str] = (),
        rename: Mapping[str, str] | None = None,
        required: Mapping[str, bool] | None = None,
    ) -> None:
        self._args = (classes, set(exclude), dict(rename or {}), dict(required or {}))
        self._options: list[GeneratedOption] | None = None
        if all(isinstance(c, type) for c in classes):
            self._options = self._generate(*self._args)  # a field without help fails at import

    @property
    def options(self) -> list[GeneratedOption]:
        if self._options is None:
            self._options = self._generate(*self._args)
        return self._options

    @staticmethod
    def _generate(classes, exclude, rename, required) -> list[GeneratedOption]:
        classes = [c if isinstance(c, type) else c() for c in classes]
        options: list[GeneratedOption] = []
        seen: set[str] = set()
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.name in exclude or f.metadata.get("cli", True) is False:
                    continue
                if f.name in seen:
                    raise TypeError(f"field {f.name!r} is an option twice ({cls.__name__})")
                seen.add(f.name)
                o = field_option(f, hints[f.name], rename.get(f.name))
                if f.name in required:
                    o.kwargs["required"] = required[f.name]
                options.append(o)
        unknown = (exclude | set(rename) | set(required)) - {
            f.name for cls in classes for f in dataclasses.fields(cls)
        }
        if unknown:
            raise TypeError(f"OptionSet names fields that do not exist: {sorted(unknown)}")
        return options

    def ordered(self) -> list[GeneratedOption]:
        """The options grouped by metadata['group'] (groups in order of first appearance)."""
        groups: list[str | None] = []
        for o in self.options:
            if o.group not in groups:
                groups.append(o.group)
        return [o for g in groups for o in self.options if o.group == g]

    def click_params(self) -> list[click.Option]:
        return [click.Option((*o.decls, o.field), **o.kwargs) for o in self.ordered()]

    def __call__(self, command: Callable) -> Callable:
        """Decorate a click command function with the options (generated now)."""
        for o in reversed(self.ordered()):
            command = o.click_option()(command)
        return command

    def given(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """{field: parsed value} of the options given on the command line (None / () = not given)."""
        out = {}
        for o in self.options:
            value = opts.get(o.field)
            if value is None or (o.kwargs.get("multiple") and not value):
                continue
            if o.parse is not None:
                value = tuple(o.parse(v) for v in value) if o.kwargs.get("multiple") else o.parse(value)
            out[o.field] = value
        return out

    def build(self, cls: type, opts: Mapping[str, Any], **fixed: Any):
        """cls(**given options, **fixed): fields not given keep the dataclass default."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {o.field: None for o in self.options if o.none_default and o.field in names}
        values.update({k: v for k, v in self.given(opts).items() if k in names})
        return cls(**{**values, **fixed})
