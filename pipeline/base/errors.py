"""Errors that reach the user as one clear line (the CLI prints them and exits with code 2)."""


class SakError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class BadImage(SakError):
    """One source image cannot be used; the extraction skips it and records the reason."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line for an error message: whitespace collapsed, the class name when it
    has no text, cut to `limit` characters ("..." marks a cut)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
