"""Errors that reach the user as one clear line (see cli.main)."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3


class OnnxCpError(Exception):
    """A problem the user can act on: printed as one line, exit code 1."""

    exit_code = EXIT_FAILURE


class UsageError(OnnxCpError):
    """Invalid command-line arguments or parameters: exit code 2."""

    exit_code = EXIT_USAGE


class BudgetError(OnnxCpError):
    """No model meets the requested accuracy budget: exit code 3 (the CI gate)."""

    exit_code = EXIT_BUDGET


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, for one-line error reports."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
