"""How the CLI reports failures: one line on stderr, a non-zero exit, tracebacks on --debug.

Exit codes: 2 for usage errors (a bad flag value or combination: :class:`UserError`, and
Typer's own), 1 for data and runtime errors (a bad file, a diverged run, a full disk), 128 + N
when signal N stopped training. Every line names the file (and sample) at fault and says what
to do, in at most :data:`MAX_LINE` characters.
"""

from __future__ import annotations

import errno
import os
import re

DEBUG = False
MAX_LINE = 300


class UserError(Exception):
    """A usage error: a flag value or combination that cannot work (exit 2)."""

    exit_code = 2


class DataError(UserError):
    """A file the user gave is wrong (bad content, wrong kind of model): exit 1."""

    exit_code = 1


# What to do about common OS errors; the path comes from the exception.
_OS_HINTS = {
    errno.ENOSPC: "no space left on device; free space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded; free space or write elsewhere",
    errno.EACCES: "permission denied; check the folder's permissions or write elsewhere",
    errno.EPERM: "operation not permitted; check the permissions or write elsewhere",
    errno.EROFS: "read-only file system; write elsewhere",
    errno.ENOENT: "not found; check the path",
    errno.EISDIR: "is a folder; give a file path",
    errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
}
_OWN_MESSAGE = (UserError, ValueError, FloatingPointError)
_ADDRESS = re.compile(r"<_io\.\w+ object at 0x[0-9a-f]+>")


def _os_error(exc: OSError) -> str:
    if exc.errno is None or exc.filename is None:
        return str(exc)  # raised with a message of ours: "<path>: <reason>"
    reason = exc.strerror or ""
    if exc.errno in _OS_HINTS and reason in ("", os.strerror(exc.errno)):
        reason = _OS_HINTS[exc.errno]
    return f"{exc.filename}: {reason}"


def shorten(message: str, limit: int = MAX_LINE) -> str:
    """``message`` on one line of at most ``limit`` characters; a long one keeps its start (the
    file) and its end (the fix)."""
    line = _ADDRESS.sub("<bytes>", " ".join(message.split()))
    if len(line) <= limit:
        return line
    head = (limit - 5) * 2 // 3
    return f"{line[:head]} ... {line[-(limit - 5 - head):]}"


def describe(exc: BaseException) -> str:
    """One line naming what went wrong; the exception's own message when it has one."""
    message = " ".join(str(exc).split())
    if isinstance(exc, OSError):
        text = _os_error(exc)
    elif isinstance(exc, _OWN_MESSAGE) and message:
        text = message
    else:
        text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return shorten(text)


def usage_line(exc: BaseException) -> str | None:
    """The one-line message for Typer/Click's own usage errors (missing option, bad value),
    or None for any other exception. Bare ``cf`` / ``cf COMMAND`` still print their help."""
    if not (hasattr(exc, "format_message") and getattr(exc, "exit_code", None) == 2):
        return None
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
        return ctx.get_help()
    where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
    return f"cf: error: {shorten(exc.format_message().rstrip('.') + where)}"


def exit_code(exc: BaseException) -> int:
    return getattr(exc, "exit_code", 1)
