"""Progress bars on stderr, silent when stderr is not a terminal or when quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every progress bar of this process (the CLI's --quiet)."""
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "") -> Iterator[T]:
    """Wrap an iterable in a progress bar when a person is watching."""
    if not enabled():
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def bar(total: int | None, desc: str = "") -> tqdm:
    """A manually advanced bar (call .update(n), .close()); disabled when silent."""
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, disable=not enabled(),
                dynamic_ncols=True)
