"""Errors that reach the user as one clear line (see cli.main)."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_BUDGET = 3


class OnnxCpError(Exception):
    """A problem the user can act on: printed as one line, exit code 1."""

    exit_code = EXIT_FAILURE


class UsageError(OnnxCpError):
    """An invalid parameter value, anywhere in onnx-cp: exit code 2.

    `option` names the parameter as the Python API spells it (`target_speedup`, `rank`); the message
    then reads "option: detail", and the CLI rewords it with the option's flag (`--target-speedup`).
    """

    exit_code = EXIT_USAGE

    def __init__(self, detail: str, *, option: str | None = None) -> None:
        super().__init__(f"{option}: {detail}" if option else detail)
        self.option = option
        self.detail = detail

    def worded_for(self, flag_of: dict[str, str]) -> str:
        """The message with the option named by its flag (flag_of maps API names to flags)."""
        if self.option is None:
            return self.detail
        return f"{flag_of.get(self.option, '--' + self.option.replace('_', '-'))}: {self.detail}"


class BudgetError(OnnxCpError):
    """No model meets the requested accuracy budget: exit code 3 (the CI gate). `report`: what the
    run measured before it failed, when it got that far (the CLI writes it as --report asks)."""

    exit_code = EXIT_BUDGET

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, for one-line error reports."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(exc).__name__
