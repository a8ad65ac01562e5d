"""How the CLI reports failures: one line on stderr, a non-zero exit, tracebacks on --debug."""

from __future__ import annotations

DEBUG = False


class UserError(Exception):
    """A failure caused by the user's input (bad file, bad flag combination): no traceback."""

    exit_code = 2


def describe(exc: BaseException) -> str:
    """One line naming what went wrong; the exception's own message when it has one."""
    message = " ".join(str(exc).split())
    if isinstance(exc, UserError | FileNotFoundError | ValueError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def exit_code(exc: BaseException) -> int:
    return getattr(exc, "exit_code", 1)
