"""Errors that reach the user as one clear line (the CLI prints them and exits with code 2)."""


class SakError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""


class BadImage(SakError):
    """One source image cannot be used; the extraction skips it and records the reason."""
