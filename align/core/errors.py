"""User-facing errors: one line on stderr, exit code 2, no traceback unless --debug."""

from __future__ import annotations

import errno
import os
import re


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


# How errors raised in Rust (safetensors, tokenizers) carry an OS error: only in their message.
OS_ERROR_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


def os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind an exception: the exception itself, one it was raised from (or while handling, as a
    traceback shows it), or one a library reports only in its message as `(os error N)`. None when there is none:
    then the exception is not the environment's."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            return current
        found = OS_ERROR_IN_MESSAGE.search(str(current))
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return None


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def raise_write_error(exc: BaseException, path: object) -> None:
    """One line naming `path` when `exc` is (or wraps) a failed write: a full disk, a quota, a denied write."""
    cause = os_error_in(exc)
    if cause is not None and cause.errno in WRITE_ERRNOS:
        raise AlignError(f"cannot write to {path}: {cause.strerror}") from None
