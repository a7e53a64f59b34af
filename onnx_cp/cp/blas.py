"""Best-effort control of OpenBLAS threads (numpy's and scipy's bundled builds).

CP steps are many small GEMMs; with several BLAS threads on a busy machine they spend their time
spinning (measured: a Gramian product 1.6 ms on one thread, 98 ms on two under load). Parallelism
comes from decompose_many's processes instead, so the solver runs its BLAS on one thread.
Where no OpenBLAS is found (MKL, Accelerate, ...) this does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator

_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")
_GETTERS = ("openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads", "openblas_get_num_threads64_")
_controls: list[tuple] | None = None


def _find_controls() -> list[tuple]:
    """(get, set) pairs for every OpenBLAS library loaded into this process."""
    paths = set()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "openblas" in path.lower() and path.startswith("/"):
                    paths.add(path)
    except OSError:
        return []
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        setter = next((getattr(lib, n) for n in _SETTERS if hasattr(lib, n)), None)
        getter = next((getattr(lib, n) for n in _GETTERS if hasattr(lib, n)), None)
        if setter is not None and getter is not None:
            getter.restype = ctypes.c_int
            controls.append((getter, setter))
    return controls


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the body with `n` OpenBLAS threads (None: leave as is), then restore."""
    global _controls
    if n is None:
        yield
        return
    if _controls is None:
        import numpy  # noqa: F401  (load the libraries before looking for them)
        import scipy.linalg  # noqa: F401
        _controls = _find_controls()
    saved = [get() for get, _ in _controls]
    for _, set_threads in _controls:
        set_threads(int(n))
    try:
        yield
    finally:
        for (_, set_threads), old in zip(_controls, saved):
            set_threads(old)
