"""The README and docs/ say what the code does: every `sak-cache` / `sak-train` command line they show
parses (each option is one the subcommand's --help lists, given a value when it takes one), every
transcript shows what the command prints today, every page the README links exists, and the README
starts with the commands (quick start within its first 80 lines)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import click
import doc_examples
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
INLINE = re.compile(r"`((?:sak-cache|sak-train) [^`]+)`")
PLACEHOLDER = {"...", "…"}


@dataclass(frozen=True)
class Shown:
    page: str
    line: str


def _joined(block: str) -> list[str]:
    """The block's lines with backslash continuations joined, transcript outputs left out."""
    out, pending = [], ""
    for raw in block.split("\n"):
        line = raw.rstrip()
        if line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _command_of(line: str) -> str | None:
    """`sak-cache ...` / `sak-train ...` in a shell line (also after torchrun's `-m sak.cli.train`)."""
    line = line.split(";")[0] if line.lstrip().startswith("sak-") else line
    m = re.search(r"(?:^|\s|&&\s*)(sak-cache|sak-train)\s", line)
    if m:
        return line[m.start(1) :]
    m = re.search(r"-m sak\.cli\.(train|cache)\s", line)
    if m:
        return ("sak-train " if m.group(1) == "train" else "sak-cache ") + line[m.end() :]
    return None


def shown_commands() -> list[Shown]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for block in FENCE.findall(text):
            for line in _joined(block):
                cmd = _command_of(line)
                if cmd:
                    found.append(Shown(page.name, cmd))
        for span in INLINE.findall(FENCE.sub("", text)):
            found.append(Shown(page.name, span))
    return found


def _groups() -> dict[str, click.Group]:
    from sak.cli.cache import cli as cache_cli
    from sak.cli.train import cli as train_cli

    return {"sak-cache": cache_cli, "sak-train": train_cli}


def _tokens(command: str) -> list[str]:
    tokens = shlex.split(command.split(" | ")[0].split(" && ")[0], comments=True)
    cleaned = []
    for t in tokens:
        t = t.strip("[]")  # `[--codec fp16]`: an optional part, shown in brackets
        if t and t not in PLACEHOLDER and t != "|":
            cleaned.append(t)
    return cleaned


def problems_of(command: str) -> list[str]:
    """What --help of the subcommand does not accept in this command line (empty: it parses)."""
    tokens = _tokens(command)
    group = _groups()[tokens[0]]
    if len(tokens) < 2 or tokens[1].startswith("-"):
        params = group.get_params(click.Context(group, info_name=tokens[0]))
        names = {o for p in params for o in (*p.opts, *p.secondary_opts)}
        return [
            f"{t} is not an option of {tokens[0]}" for t in tokens[1:] if t.startswith("-") and t not in names
        ]
    # `sak-train CMD ...`: a placeholder for any subcommand; its options must be some subcommand's
    subs = list(group.commands.values()) if tokens[1].isupper() else [group.commands.get(tokens[1])]
    if subs == [None]:
        return [f"{tokens[0]} has no subcommand {tokens[1]!r}"]
    options = {}
    for sub in subs:  # generated options included, --help too
        params = sub.get_params(click.Context(sub, info_name=sub.name))
        options |= {o: p for p in params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    bad, i, rest = [], 2, tokens[2:]
    while i - 2 < len(rest):
        t = tokens[i]
        i += 1
        if not t.startswith("-") or t == "-":
            continue
        name = t.split("=", 1)[0]
        param = options.get(name)
        if param is None:
            bad.append(f"{name} is not an option of `{tokens[0]} {tokens[1]}`")
            continue
        # a value-taking option may have a flag form (`--resume` alone): click's flag_value then stands in
        takes_value = not (param.is_flag or param.count) and not isinstance(param.flag_value, bool)
        if takes_value and "=" not in t:
            if i >= len(tokens) or tokens[i].startswith("--"):
                bad.append(f"{name} needs a value")
            else:
                i += 1
    return bad


def test_the_pages_show_commands():
    shown = shown_commands()
    assert len(shown) > 60, len(shown)
    assert {s.page for s in shown} >= {"README.md", "extracting.md", "training.md", "stage2.md", "tiger.md"}


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_every_command_line_shown_parses(page):
    bad = []
    for s in shown_commands():
        if s.page == page:
            bad += [f"{s.line!r}: {p}" for p in problems_of(s.line)]
    assert not bad, "\n".join(bad)


def test_the_parser_of_this_test_refuses_what_help_would():
    assert problems_of("sak-cache run --source a --out b --no-such-option 3")
    assert problems_of("sak-cache run --source")  # a value missing
    assert problems_of("sak-train nosuchcommand --x")
    assert not problems_of("sak-cache run --source a --out b --teachers dinov2_tiny  # a comment")


def test_transcripts_show_what_the_commands_print_today():
    stale = [p.name for p in doc_examples.pages() if doc_examples.rewritten(p)[1]]
    assert not stale, f"{stale}: run `python tests/doc_examples.py --write`"


def test_every_linked_page_exists_and_the_readme_starts_with_the_commands():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link
    head = "\n".join(readme.split("\n")[:80])
    for step in ("make demo", "make test", "sak-cache run", "sak-cache inspect", "sak-train stage1"):
        assert step in head, step
    assert "## Contents" in head


def test_the_repo_stands_on_its_own():
    """Code, docs and tests cite no document that is not in the repo (design notes, lists of pitfalls)."""
    outside = re.compile(r"\bDESIGN(?:\.md| ?§| section)|\bPITFALLS\b|\bSTYLE\.md\b")
    cited = []
    for folder in ("pipeline", "kernels", "student", "cli", "tests", "docs", "bench", "docker"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".md", ".yaml", ".sh", ".toml", ".json"} and path.is_file():
                if outside.search(path.read_text(errors="replace")) and path.name != "test_docs.py":
                    cited.append(str(path.relative_to(ROOT)))
    for path in ("README.md", "pyproject.toml", "Makefile"):
        if outside.search((ROOT / path).read_text()):
            cited.append(path)
    assert not cited, cited
