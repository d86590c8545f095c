"""What the job CLIs share: ``--config RECIPE key=value ...``, the launcher's ``--local_rank``, exit codes.

Exit codes: 0 done; 2 a problem for the user to fix, named in the message: a configuration
error (raised before any work or by the job as a ``ConfigError``), a folder another run
holds (``LeaseHeld``), or another error type the job declares; 3 the store stayed
unreachable for the whole retry window (``StorageUnavailable``; the last committed
checkpoint is intact, resume with ``resume=auto``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any, Callable, Optional, Sequence


def parse_args(doc: str, recipes: str, example: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help=f"YAML recipe ({recipes})")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    return p.parse_args(argv)


def run_job(args: argparse.Namespace, load: Callable[[str, list[str]], Any], job: Callable[[Any], Any],
            user_errors: tuple[type[Exception], ...] = ()) -> int:
    """Load the config (errors: exit 2 before anything starts), run ``job(cfg)`` (ConfigError and
    ``user_errors``: exit 2 with the message; anything else propagates with its traceback)."""
    from pipeline.logs import setup_logging

    try:
        setup_logging(logging.WARNING)
    except ValueError as err:  # a bad FUSMAE_LIBRARY_LOG_LEVEL
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from launch.config import ConfigError
    from pipeline.lease import LeaseHeld
    from pipeline.storage import StorageUnavailable

    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        job(cfg)
    except (ConfigError, LeaseHeld, *user_errors) as err:
        print(f"error: {message(err)}", file=sys.stderr, flush=True)
        return 2
    except StorageUnavailable as err:
        print(f"error: {message(err)}", file=sys.stderr, flush=True)
        return 3
    return 0


_FROM_WORKER = re.compile(r"Caught \w+ (in DataLoader worker process \d+)\.\nOriginal Traceback")


def message(err: BaseException) -> str:
    """What to print for ``err``: its message. An error raised in a DataLoader worker reaches the main process
    as a new one whose text is "Caught X in DataLoader worker process N. Original Traceback ..." and the
    worker's whole traceback (torch's ``ExceptionWrapper``): its own message is taken back out of it."""
    text = str(err)
    caught = _FROM_WORKER.match(text)
    kind, module = type(err).__qualname__, type(err).__module__
    marker = f"{kind if module in ('builtins', '__main__') else f'{module}.{kind}'}: "  # as `traceback` names it
    at = text.rfind(marker)
    if caught is None or at < 0:
        return text
    return f"{text[at + len(marker):].strip()} ({caught.group(1)})"
