"""User-facing errors: one line on stderr, exit code 2, no traceback unless --debug."""

from __future__ import annotations


class AlignError(Exception):
    """A problem with the user's input or environment, reported as a single line.

    Anything else that escapes a command is a bug in alignmerge: one `internal error:` line and exit code 3 (the
    traceback with --debug).
    """

    exit_code = 2


class MissingDependencyError(AlignError):
    def __init__(self, package: str, purpose: str, install: str | None = None):
        super().__init__(
            f"{purpose} needs the optional package '{package}', which is not installed "
            f"(install it with: {install or f'pip install {package}'})"
        )


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
