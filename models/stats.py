"""Parameters, MACs and the per-layer MAC share of shipped models, as markdown (for the cards).

    python models/stats.py models/charnet.onnx models/charresnet.onnx

MACs are multiply-accumulates of Conv and Gemm for one 1x24x24 image (FLOPs ~ 2 x MACs), counted
from the kernel and output shapes by onnx_cp.measure.count_flops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

from onnx_cp.measure.flops import count_flops


def card_stats(path: Path) -> str:
    report = count_flops(str(path), {"x": [1, 1, 24, 24]})
    proto = onnx.load(str(path))
    kernels = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    weight_of = {n.name: kernels.get(n.input[1]) for n in proto.graph.node if len(n.input) > 1}
    total = report["total_macs"]
    lines = [
        f"**{path.name}**: {report['total_params']:,} parameters "
        f"({path.stat().st_size / 1e6:.1f} MB), {total / 1e6:.2f} M MACs per image "
        f"({2 * total / 1e6:.1f} MFLOPs)",
        "",
        "| layer | op | weight shape | output shape | MACs | share |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for layer in report["layers"]:
        shape = "x".join(map(str, weight_of.get(layer["name"]) or ()))
        out = "x".join(map(str, layer["output_shape"][1:]))
        lines.append(f"| {layer['name']} | {layer['op']} | {shape} | {out} | "
                     f"{layer['macs']:,} | {100 * layer['macs'] / total:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(card_stats(Path(arg)))
        print()
