"""What both command-line tools share: logging set-up and one-line errors with exit code 2."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Sequence

import click

from sak.pipeline.base.errors import SakError
from sak.pipeline.base.oserrors import write_error


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (it may be replaced after set-up, as a test's capture
    does), never to a stream closed since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _LibraryHandler(_StderrHandler):
    """The root logger's one handler: other libraries' records as logging.basicConfig would print them,
    never a `sak` record (the `sak` logger prints those itself). Installed before any library can call
    basicConfig (open_clip's logging.warning does), which would print every `sak` line a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(logging.BASIC_FORMAT))
        self.addFilter(lambda record: not record.name.startswith("sak"))


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """The `sak` logger to stderr, one line per record (quiet: errors only, e.g. torchrun's other ranks).
    Each handler is installed once, whatever the number of calls."""
    logger = logging.getLogger("sak")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    root = logging.getLogger()
    library = next((h for h in root.handlers if isinstance(h, _LibraryHandler)), None)
    if library is None:
        library = _LibraryHandler()
        root.addHandler(library)
    library.setLevel(logging.ERROR if quiet else logging.NOTSET)
    if quiet:  # another rank prints the same warnings: this one keeps only errors
        warnings.filterwarnings("ignore")
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
    logger.propagate = (
        True  # tests capture via the root logger; the CLI root has no handler, so no duplicates
    )


def version_line(prog: str) -> str:
    """`sak-cache 0.1.0 (commit 1a2b3c4d5e)`: the package version and the source tree's commit ("unknown"
    outside a checkout), as every output records them (pipeline/base/provenance.py)."""
    from sak.pipeline.base.provenance import code_version

    version, _, commit = code_version().partition("+g")
    return f"{prog} {version} (commit {commit or 'unknown'})"


def version_option(prog: str) -> Callable:
    """`--version`: print version_line and exit (computed only when asked: no git call on other runs)."""

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value and not ctx.resilient_parsing:
            click.echo(version_line(prog))
            ctx.exit()

    return click.option(
        "--version",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=show,
        help="Print the package version and commit, and exit.",
    )


def run_cli(group: click.Group, argv: Sequence[str] | None, prog: str, quiet: bool = False) -> int:
    """Run a click group in-process and return its exit code (callable from tests as `main([...])`).

    A SakError (bad input the user can fix) prints one line, `prog: error: ...`, and returns 2 (`quiet`:
    the line is left to another process that prints it, e.g. rank 0 of a torchrun launch); so does an
    OSError the user fixes (a full disk, permissions, a too-long name: pipeline/base/oserrors.py).
    """
    try:
        result = group.main(
            args=list(argv) if argv is not None else None, prog_name=prog, standalone_mode=False
        )
    except SakError as e:
        return _error_line(prog, e, quiet)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo(f"{prog}: aborted", err=True)
        return 130
    except Exception as e:  # an OSError no writer named (or a Ray task's): a full disk, permissions, ...
        error = write_error(e)
        if error is None:
            raise
        return _error_line(prog, error, quiet)
    return result if isinstance(result, int) else 0


def _error_line(prog: str, error: SakError, quiet: bool) -> int:
    if not quiet:
        click.echo(f"{prog}: error: {error}", err=True)
    return 2


def entry_point(main: Callable[[Sequence[str] | None], int]) -> Callable[[], None]:
    def entry() -> None:
        sys.exit(main(None))

    return entry
