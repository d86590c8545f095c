"""Logging for the project's commands: our own messages at INFO, the libraries' chatter kept out.

botocore logs "Found credentials in environment variables" at INFO each time a client is
made (every s3fs filesystem, in every Ray task), and Ray, s3fs and urllib3 add their own
INFO lines; under a job's INFO level they would drown its progress. `setup_logging` sets
the root level for the project and holds `LIBRARY_LOGGERS` at WARNING unless the user
asks for more with ``FUSMAE_LIBRARY_LOG_LEVEL`` (e.g. ``DEBUG`` to see every S3 request).
(Ray's worker processes keep their root logger at WARNING, so only the driver needs this.)

One asyncio ERROR is dropped too (`drop_orphaned_connection_errors`): when a connection is cut while
aiohttp sends a request (an S3 outage), the request fails and s3fs sees it (our retries log it once), but
aiohttp's own sending task holds the same error and asyncio prints it with a traceback, "Task exception
was never retrieved", once per cut request: pages of tracebacks that look like a crash during an outage
the job waits out.
"""

from __future__ import annotations

import logging
import os

LIBRARY_LOG_LEVEL_ENV = "FUSMAE_LIBRARY_LOG_LEVEL"
LIBRARY_LOGGERS = ("botocore", "boto3", "s3transfer", "aiobotocore", "s3fs", "fsspec", "urllib3", "ray",
                   "filelock", "asyncio", "torch.distributed", "huggingface_hub")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def library_level() -> int:
    """The level for the libraries' loggers: ``FUSMAE_LIBRARY_LOG_LEVEL`` (a level name), default WARNING."""
    raw = os.environ.get(LIBRARY_LOG_LEVEL_ENV, "").strip()
    if not raw:
        return logging.WARNING
    level = logging.getLevelName(raw.upper())
    if not isinstance(level, int):
        raise ValueError(f"{LIBRARY_LOG_LEVEL_ENV}={raw!r} is not a log level "
                         "(DEBUG, INFO, WARNING, ERROR or CRITICAL)")
    return level


def quiet_libraries() -> None:
    """Hold the libraries' loggers at `library_level` (idempotent)."""
    level = library_level()
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


_NEVER_RETRIEVED = ("Task exception was never retrieved", "Future exception was never retrieved")


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types of connection trouble, by type only (a message that mentions "timeout" is not one):
    the built-in ConnectionError and TimeoutError, and aiohttp's connection errors where aiohttp is installed
    (its ServerDisconnectedError and ClientOSError are not built-in ConnectionErrors)."""
    try:
        from aiohttp import ClientConnectionError
    except ImportError:
        return (ConnectionError, TimeoutError)
    return (ConnectionError, TimeoutError, ClientConnectionError)


class _OrphanedConnectionErrors(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" for connection trouble (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not str(record.msg).startswith(_NEVER_RETRIEVED):
            return True
        if not isinstance(exc, _connection_errors()):
            return True
        try:
            return library_level() <= logging.DEBUG
        except ValueError:  # a bad FUSMAE_LIBRARY_LOG_LEVEL, reported by the command that reads it
            return False


_ORPHANED = _OrphanedConnectionErrors()


def drop_orphaned_connection_errors() -> None:
    """Install the filter on asyncio's logger (idempotent); Ray tasks that use S3 call it too."""
    logger = logging.getLogger("asyncio")
    if _ORPHANED not in logger.filters:
        logger.addFilter(_ORPHANED)


def setup_logging(level: int = logging.INFO) -> None:
    """The root logger at ``level`` with the project's format, and the libraries quietened."""
    logging.basicConfig(level=level, format=FORMAT)
    quiet_libraries()
    drop_orphaned_connection_errors()
