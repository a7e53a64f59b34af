"""The CP chain: for a Conv with kernel K (T, S/G, kh, kw) and group G, each group's kernel is
K_g[t,s,y,x] ~ sum_r Kt[t,r] Ks[s,r] Ky[y,r] Kx[x,r] and the Conv becomes

    1x1 (S -> R*G, group G) -> kh x 1 (depthwise, vertical pads/stride/dilation)
        -> 1 x kw (depthwise, horizontal pads/stride/dilation) -> 1x1 (R*G -> T, group G, bias)

Exact for any pads, strides, dilations and auto_pad (see graph/stages.py). Factors per group:
[Kt (T/G, R), Ks (S/G, R), Ky (kh, R), Kx (kw, R)], any scaling: they are balanced here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp import cp
from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import HORIZONTAL, NONE, VERTICAL, StageShape

FORM = "cp"


def layout(site: ConvSite, rank: int) -> list[StageShape]:
    t, s, kh, kw = site.kernel.shape
    channels = rank * site.group
    stages = [
        StageShape("in", channels, s, (1, 1), site.group, NONE),
        StageShape("vertical", channels, 1, (kh, 1), 1 if site.folds_input_stage else channels, VERTICAL),
        StageShape("horizontal", channels, 1, (1, kw), channels, HORIZONTAL),
        StageShape("out", t, rank, (1, 1), site.group, NONE),
    ]
    # One input channel: the 1x1 input stage is a per-channel scale, folded into the vertical one.
    return stages[1:] if site.folds_input_stage else stages


def weights(site: ConvSite, per_group: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], float | None]:
    """The stage weights, group-major channel order (channel g*R + r), and the largest rank-one
    term's norm relative to the kernel's (how degenerate the decomposition is)."""
    balanced = [cp.balance(list(f)) for f in per_group]
    kt = np.concatenate([f[0] for f in balanced])  # (T, R): output channel g*T/G + t
    ks = np.concatenate([f[1].T for f in balanced])  # (G*R, S/G)
    ky = np.concatenate([f[2].T for f in balanced])  # (G*R, kh)
    kx = np.concatenate([f[3].T for f in balanced])  # (G*R, kw)
    arrays = [ks[:, :, None, None], ky[:, None, :, None], kx[:, None, None, :], kt[:, :, None, None]]
    if site.folds_input_stage:
        arrays = [arrays[0] * arrays[1], *arrays[2:]]
    norm = float(np.linalg.norm(site.kernel.astype(np.float64)))
    max_norm = max(float(cp.component_norms(f).max()) for f in balanced) / norm if norm > 0 else 0.0
    return arrays, max_norm
