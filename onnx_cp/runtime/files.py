"""Atomic file writes: every file onnx-cp writes (reports, data, caches, checkpoints, plots) goes
through `atomic_write`, so a reader never sees half a file and a failure leaves nothing behind.
Models, which come with external data, have their own staged save in model_io."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from onnx_cp.errors import OnnxCpError


def output_folder(path: Path) -> Path:
    """The existing folder `path` will be written into (one-line error otherwise)."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OnnxCpError(f"{path}: folder {folder} does not exist")
    return folder


def check_replaceable(path: Path) -> None:
    """Only a regular file (or nothing) may be replaced: renaming onto a device node or a FIFO would
    swap it for a regular file (as root, `OUT=/dev/null` would replace the machine's /dev/null)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OnnxCpError(f"{path}: cannot write ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise OnnxCpError(f"{path}: is a folder")
    if not stat.S_ISREG(mode):
        raise OnnxCpError(f"{path}: not a regular file; refusing to replace it")


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links too); False when either does not exist and
    their resolved paths differ."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` ("w" text in UTF-8, or "wb"); on success it is renamed
    onto `path` with the usual file mode (0666 less the umask), on any failure it is removed."""
    path = Path(path)
    folder = output_folder(path)
    check_replaceable(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private
        check_replaceable(path)  # again: it may have changed while we wrote
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise OnnxCpError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
