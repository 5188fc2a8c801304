"""What every click command shares: one-line errors with exit code 2, `--debug`, logging set-up."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from align.core.errors import AlignError, os_error_in

F = TypeVar("F", bound=Callable[..., Any])

debug_option = click.option("--debug", is_flag=True, default=False, help="Show full tracebacks on errors.")

# Every command group (`align`, `merge`) takes -h as --help; subcommands inherit it from their group's context.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) off the user's terminal; our bars stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # kernels (pulled in by transformers' bitsandbytes integration) warns at import that an offline hub skips its
    # publisher check, which would put a line before a bad-input error
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch", "huggingface_hub", "mergekit",
                 "bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass


# Exit status of an unexpected exception (a bug): distinct from bad input (2), click usage errors (2) and 130.
INTERNAL_ERROR_EXIT = 3


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (a value quoted in it may carry line breaks)."""
    text = str(exc).strip()
    return text.replace("\r", "\\r").replace("\n", "\\n")[:2000]


def environment_message(exc: OSError) -> str:
    """`OSError: No space left on device (PATH)`: what failed, and on which path when the error names one."""
    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    reason = exc.strerror or one_line(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {reason}{where}"


def handle_errors(fn: F) -> F:
    """Turn AlignError (and an OSError, also one behind another exception, and MemoryError) into `error: ...` on
    stderr and exit 2, any other exception into `internal error: ...` and exit 3; `--debug` (or ALIGNMERGE_DEBUG=1)
    re-raises with the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False) or os.environ.get("ALIGNMERGE_DEBUG") == "1"
        logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("align").setLevel(logging.INFO)
        if not debug:
            quiet_libraries()
        try:
            from align.core.versions import check_library_versions

            check_library_versions()
            return fn(*args, **kwargs)
        except AlignError as exc:
            if debug:
                raise
            click.echo(f"error: {one_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own: usage errors print their usage and exit 2
        except MemoryError as exc:
            if debug:
                raise
            click.echo(f"error: MemoryError: {one_line(exc) or 'out of memory'}", err=True)
            sys.exit(AlignError.exit_code)
        except Exception as exc:
            if debug:
                raise
            cause = os_error_in(exc)
            if cause is not None:
                # The environment, not the input or a bug: a full disk, a denied write, an unreadable file, also
                # when a library wraps it (safetensors' `os error 28`).
                click.echo(f"error: {environment_message(cause)}", err=True)
                sys.exit(AlignError.exit_code)
            # Anything else is a bug in alignmerge: one line and its own exit code, so scripts can tell it from bad
            # input; output dirs are already cleaned up by the context managers the exception passed through.
            click.echo(f"internal error: {type(exc).__name__}: {one_line(exc)} (run with --debug for the traceback)",
                       err=True)
            sys.exit(INTERNAL_ERROR_EXIT)

    return wrapper  # type: ignore[return-value]


class OneLineGroup(click.Group):
    """A command group whose usage errors (an unknown option, a bad choice, a missing argument) are one `error:`
    line and exit 2 like every other bad input, instead of click's three lines of usage."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else self.name
            click.echo(f"error: {one_line(exc.format_message())} (`{command} --help` lists the options)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)


def comma_floats(value: str | None, name: str) -> list[float] | None:
    """Parse `0.7,0.3` into floats, naming the option on error."""
    if value is None:
        return None
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise AlignError(f"{name} {value!r}: expected comma-separated numbers") from None
