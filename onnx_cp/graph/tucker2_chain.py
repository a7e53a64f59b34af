"""The Tucker-2 chain (Kim et al., ICLR 2016): each group's kernel is
K_g[t,s,y,x] ~ sum_{a,b} U_out[t,b] C[b,a,y,x] U_in[s,a], and the Conv becomes

    1x1 (S -> R_in*G, group G) -> kh x kw (R_in*G -> R_out*G, group G, all of the Conv's
        pads/strides/dilations/auto_pad) -> 1x1 (R_out*G -> T, group G, bias)

Exact for the same reasons as the CP chain (graph/stages.py). Factors per group:
[U_out (T/G, R_out), C (R_out, R_in, kh, kw), U_in (S/G, R_in)]; rank (R_in, R_out)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnx_cp.graph.sites import ConvSite
from onnx_cp.graph.stages import BOTH, NONE, StageShape

FORM = "tucker2"


def layout(site: ConvSite, rank: tuple[int, int]) -> list[StageShape]:
    t, s, kh, kw = site.kernel.shape
    r_in, r_out = rank
    g = site.group
    return [
        StageShape("in", r_in * g, s, (1, 1), g, NONE),
        StageShape("core", r_out * g, r_in, (kh, kw), g, BOTH),
        StageShape("out", t, r_out, (1, 1), g, NONE),
    ]


def weights(site: ConvSite, per_group: Sequence[Sequence[np.ndarray]]) -> tuple[list[np.ndarray], float | None]:
    u_in = np.concatenate([f[2].T for f in per_group])[:, :, None, None]  # (G*R_in, S/G, 1, 1)
    core = np.concatenate([f[1] for f in per_group])  # (G*R_out, R_in, kh, kw)
    u_out = np.concatenate([f[0] for f in per_group])[:, :, None, None]  # (T, R_out, 1, 1)
    return [u_in, core, u_out], None
