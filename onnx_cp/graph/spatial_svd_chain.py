"""The spatial-SVD chain (AIMET's spatial SVD): each group's kernel as a (S/G*kh, T/G*kw) matrix is
A B, and the Conv becomes

    kh x 1 (S -> R*G, group G, vertical pads/stride/dilation)
        -> 1 x kw (R*G -> T, group G, horizontal pads/stride/dilation, bias)

Exact for the same reasons as the CP chain (graph/stages.py). Factors per group:
[H (T/G, R, kw), V (R, S/G, kh)]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import HORIZONTAL, VERTICAL, StageShape

FORM = "spatial_svd"


def layout(site: ConvSite, rank: int) -> list[StageShape]:
    t, s, kh, kw = site.kernel.shape
    g = site.group
    return [StageShape("vertical", rank * g, s, (kh, 1), g, VERTICAL),
            StageShape("horizontal", t, rank, (1, kw), g, HORIZONTAL)]


def weights(site: ConvSite, per_group: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], float | None]:
    v = np.concatenate([f[1] for f in per_group])[:, :, :, None]  # (G*R, S/G, kh, 1)
    h = np.concatenate([f[0] for f in per_group])[:, :, None, :]  # (T, R, 1, kw)
    return [v, h], None
