"""Atomic file writes: every file onnx-cp writes (reports, data, caches, checkpoints, plots) goes
through `atomic_write`, so a reader never sees half a file and a failure leaves nothing behind.
Models, which come with external data, have their own staged save in model_io."""

from __future__ import annotations

import contextlib
import os
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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path` ("w" text in UTF-8, or "wb"); on success it is renamed
    onto `path` with the usual file mode (0666 less the umask), on any failure it is removed."""
    path = Path(path)
    folder = output_folder(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        encoding = None if "b" in mode else "utf-8"
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private
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
