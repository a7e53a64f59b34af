"""The channel-SVD chain (AIMET's weight SVD): each group's (T/G, S/G*kh*kw) kernel matrix is U V,
and the Conv becomes

    kh x kw (S -> R*G, group G, all of the Conv's pads/strides/dilations/auto_pad)
        -> 1x1 (R*G -> T, group G, bias)

For a 1x1 conv that is two thin 1x1 convs, the one form that gains anything there.
Factors per group: [U (T/G, R), V (R, S/G, kh, kw)]."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import BOTH, NONE, StageShape

FORM = "svd"


def layout(site: ConvSite, rank: int) -> list[StageShape]:
    t, s, kh, kw = site.kernel.shape
    g = site.group
    return [StageShape("in", rank * g, s, (kh, kw), g, BOTH), StageShape("out", t, rank, (1, 1), g, NONE)]


def weights(site: ConvSite, per_group: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], float | None]:
    v = np.concatenate([f[1] for f in per_group])  # (G*R, S/G, kh, kw)
    u = np.concatenate([f[0] for f in per_group])[:, :, None, None]  # (T, R, 1, 1)
    return [v, u], None
