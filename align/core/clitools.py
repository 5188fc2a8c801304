"""What every click command shares: one-line errors with exit code 2, `--debug`, logging set-up."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from align.core.errors import AlignError

F = TypeVar("F", bound=Callable[..., Any])

debug_option = click.option("--debug", is_flag=True, default=False, help="Show full tracebacks on errors.")


def quiet_libraries() -> None:
    """Keep library chatter (weight-loading bars, advisory warnings) off the user's terminal; our bars stay."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("transformers", "datasets", "peft", "trl", "accelerate", "torch", "huggingface_hub", "mergekit",
                 "bitsandbytes"):
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


def handle_errors(fn: F) -> F:
    """Turn AlignError into `error: ...` on stderr and exit 2; `--debug` (or ALIGNMERGE_DEBUG=1) re-raises."""

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
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def comma_floats(value: str | None, name: str) -> list[float] | None:
    """Parse `0.7,0.3` into floats, naming the option on error."""
    if value is None:
        return None
    try:
        return [float(v) for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise AlignError(f"{name} {value!r}: expected comma-separated numbers") from None
