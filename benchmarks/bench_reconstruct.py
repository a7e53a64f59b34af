"""Layer-wise reconstruction on a YOLO-style detector: wall time and per-layer errors.

Builds (seeded, no network) a ~60-Conv YOLOv8n-like detector (stride-2 3x3 downsampling, SiLU,
C2f blocks with residual bottlenecks, SPPF, a PAN neck and a decoupled detect head), with
BatchNorm folded and weights rescaled layer by layer on sample images so that every conv's output
has unit variance per channel (statistics like a trained net's, not like a random init's). Exports
it at 1x3x320x320 (opset 17), decomposes it at rank 16 with `onnx_cp.optimize` (no
reconstruction), then times `reconstruct_layers(det_cp, det, inputs)` on 400 smooth multi-scale
random images (flips and crops of 100 base images), and writes benchmarks/results/reconstruct.md.

    PYTHONPATH=$PWD python benchmarks/bench_reconstruct.py                  # current code
    PYTHONPATH=$PWD python benchmarks/bench_reconstruct.py --impl REV_OR_FILE --chains 3
        # an older reconstruct.py (a git revision or a file), fitted on its first 3 chains only

Results are appended to benchmarks/results/reconstruct.json (one entry per run) and the markdown
table is rebuilt from all entries.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("BENCH_WORK", "/tmp/recon"))
RESULTS = HERE / "results"


# --- the detector ---------------------------------------------------------------------------

class ConvBN(nn.Module):
    def __init__(self, c_in, c_out, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=True)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2, self.add = ConvBN(c, c, 3), ConvBN(c, c, 3), shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c_in, c_out, n=1, shortcut=True):
        super().__init__()
        self.c = c_out // 2
        self.cv1 = ConvBN(c_in, 2 * self.c, 1)
        self.cv2 = ConvBN((2 + n) * self.c, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c_in, c_in // 2, 1), ConvBN(c_in * 2, c_out, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class Detector(nn.Module):
    """YOLOv8n-like (width 0.25): 64 Convs, outputs the three heads concatenated per level."""

    def __init__(self, classes=20):
        super().__init__()
        w = [16, 32, 64, 128, 256]
        self.stem = ConvBN(3, w[0], 3, 2)
        self.d1, self.c1 = ConvBN(w[0], w[1], 3, 2), C2f(w[1], w[1], 1)
        self.d2, self.c2 = ConvBN(w[1], w[2], 3, 2), C2f(w[2], w[2], 2)
        self.d3, self.c3 = ConvBN(w[2], w[3], 3, 2), C2f(w[3], w[3], 2)
        self.d4, self.c4 = ConvBN(w[3], w[4], 3, 2), C2f(w[4], w[4], 1)
        self.sppf = SPPF(w[4], w[4])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n1 = C2f(w[4] + w[3], w[3], 1, False)
        self.n2 = C2f(w[3] + w[2], w[2], 1, False)
        self.n3d, self.n3 = ConvBN(w[2], w[2], 3, 2), C2f(w[2] + w[3], w[3], 1, False)
        self.n4d, self.n4 = ConvBN(w[3], w[3], 3, 2), C2f(w[3] + w[4], w[4], 1, False)
        box, cls = 64, max(w[2], classes)
        self.box = nn.ModuleList(nn.Sequential(ConvBN(c, box, 3), ConvBN(box, box, 3), nn.Conv2d(box, 64, 1))
                                 for c in (w[2], w[3], w[4]))
        self.cls = nn.ModuleList(nn.Sequential(ConvBN(c, cls, 3), ConvBN(cls, cls, 3), nn.Conv2d(cls, classes, 1))
                                 for c in (w[2], w[3], w[4]))

    def forward(self, x):
        x = self.c1(self.d1(self.stem(x)))
        p3 = self.c2(self.d2(x))
        p4 = self.c3(self.d3(p3))
        p5 = self.sppf(self.c4(self.d4(p4)))
        h4 = self.n1(torch.cat([self.up(p5), p4], 1))
        o3 = self.n2(torch.cat([self.up(h4), p3], 1))
        o4 = self.n3(torch.cat([self.n3d(o3), h4], 1))
        o5 = self.n4(torch.cat([self.n4d(o4), p5], 1))
        outs = [torch.cat([b(o), c(o)], 1).flatten(2) for o, b, c in zip((o3, o4, o5), self.box, self.cls)]
        return torch.cat(outs, 2)


def smooth_images(n: int, seed: int, size: int = 320) -> np.ndarray:
    """n 3 x size x size images: a 1/f-like sum of upsampled noise at five scales plus a few
    random rectangles and disks (edges), normalised like ImageNet-preprocessed photos; flips and
    random crops of n // 4 base images."""
    rng = np.random.default_rng(seed)
    base_n = max(1, n // 4)
    big = size + size // 4
    bases = np.zeros((base_n, 3, big, big), np.float32)
    for scale in (4, 8, 16, 32, 64):
        noise = torch.from_numpy(rng.standard_normal((base_n, 3, scale, scale)).astype(np.float32))
        bases += torch.nn.functional.interpolate(noise, size=(big, big), mode="bicubic",
                                                 align_corners=False).numpy() * (scale ** -0.5) * 2
    yy, xx = np.mgrid[:big, :big]
    for image in bases:
        for _ in range(6):
            cy, cx, r = rng.integers(0, big, 2).tolist() + [int(rng.integers(big // 20, big // 5))]
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else \
                ((abs(yy - cy) < r) & (abs(xx - cx) < r * 0.6))
            image[:, mask] = rng.standard_normal((3, 1)).astype(np.float32)
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        b = bases[i % base_n]
        y0, x0 = rng.integers(0, big - size + 1, 2)
        crop = b[:, y0:y0 + size, x0:x0 + size]
        out[i] = crop[:, :, ::-1] if rng.random() < 0.5 else crop
    return out


@torch.no_grad()
def build_detector(seed: int, calib: np.ndarray) -> nn.Module:
    """Random weights, rescaled conv by conv (in forward order) so each output channel has zero
    mean and unit variance on `calib` before its activation: what folding trained BatchNorms gives."""
    torch.manual_seed(seed)
    model = Detector().eval()
    x = torch.from_numpy(calib)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        seen = {}
        handle = conv.register_forward_hook(lambda m, i, o, seen=seen: seen.setdefault("y", o))
        model(x)
        handle.remove()
        y = seen["y"]
        mean, std = y.mean((0, 2, 3)), y.std((0, 2, 3)).clamp_min(1e-6)
        gamma = torch.empty_like(std).uniform_(0.5, 1.5)
        conv.weight.mul_((gamma / std).view(-1, 1, 1, 1))
        conv.bias.copy_((conv.bias - mean) * gamma / std + torch.randn_like(mean) * 0.3)
    return model


def make_models(seed: int) -> tuple[Path, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    det, det_cp = WORK / "det.onnx", WORK / "det-cp.onnx"
    if not det.exists():
        model = build_detector(seed, smooth_images(16, seed=seed + 100))
        torch.onnx.export(model, torch.zeros(1, 3, 320, 320), det, dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output"],
                          dynamic_axes={"images": {0: "batch"}, "output": {0: "batch"}})
    if not det_cp.exists():
        subprocess.run([sys.executable, "-m", "onnx_cp", "optimize", str(det), str(det_cp), "--rank", "16",
                        "--reconstruct-steps", "0", "-q"], check=True)
    return det, det_cp


def load_impl(impl: str | None):
    """The reconstruct module: current code, a file, or onnx_cp/finetune/reconstruct.py at a git rev."""
    if impl is None:
        from onnx_cp.finetune import reconstruct
        return reconstruct
    path = Path(impl)
    if not path.exists():
        path = WORK / f"reconstruct_{impl}.py"
        source = subprocess.run(["git", "show", f"{impl}:onnx_cp/finetune/reconstruct.py"], cwd=HERE.parent,
                                check=True, capture_output=True, text=True).stdout
        path.write_text(source)
    spec = importlib.util.spec_from_file_location("reconstruct_impl", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reconstruct_impl"] = module
    spec.loader.exec_module(module)
    return module


def cpu_kind() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    kind = [f for f in ("avx2", "avx512f", "avx512_vnni") if f in flags]
    return f"{os.cpu_count()} cores, " + ("/".join(kind) or "no avx2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", help="git revision or file of an older reconstruct.py (default: current)")
    parser.add_argument("--label", help="label of this run in the table")
    parser.add_argument("--chains", type=int, help="fit only the first N chains (others stay as decomposed)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    det, det_cp = make_models(args.seed)
    module = load_impl(args.impl)
    original, rewritten = onnx.load(det), onnx.load(det_cp)
    from onnx_cp.graph import naming
    chains = list(naming.find_chains(rewritten.graph.node))
    if args.chains is not None and args.chains < len(chains):
        # leave the later chains out of reconstruction: rename their nodes so they are no chain
        keep = set(chains[:args.chains])
        for node in rewritten.graph.node:
            if naming.layer_of(node.name) not in keep and naming.layer_of(node.name) != node.name:
                node.name = node.name.replace(naming.SEPARATOR, "/not-fitted/")
    inputs = smooth_images(args.images, seed=args.seed + 1)
    started, cpu_started = time.perf_counter(), time.process_time()
    _, fits = module.reconstruct_layers(rewritten, original, inputs, seed=args.seed)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    load = os.getloadavg()[0]
    fitted = module.fits_report(fits)
    entry = {"label": args.label or (f"impl {args.impl}" if args.impl else "current"), "impl": args.impl or "current",
             "chains_fitted": len(fitted), "chains_total": len(chains), "images": args.images, "seconds": round(seconds, 1),
             "cpu_seconds": round(cpu_seconds, 1), "load_average": round(load, 1),
             "seconds_per_chain": round(seconds / max(1, len(fitted)), 1), "cpu": cpu_kind(),
             "torch_threads": torch.get_num_threads(), "layers": fitted,
             "convs": sum(n.op_type == "Conv" for n in original.graph.node)}
    print(json.dumps({k: v for k, v in entry.items() if k != "layers"}))
    for f in fitted:
        print(f"{f['layer']:40s} n={f['samples']:5d} before={f['error_before'] or float('nan'):.4f} "
              f"after={f['error_after'] or float('nan'):.4f} {f['status']}")
    RESULTS.mkdir(exist_ok=True)
    store = RESULTS / "reconstruct.json"
    entries = json.loads(store.read_text()) if store.exists() else []
    entries = [e for e in entries if e["label"] != entry["label"]] + [entry]
    store.write_text(json.dumps(entries, indent=1) + "\n")
    write_markdown(entries)
    return 0


def write_markdown(entries: list[dict]) -> None:
    lines = ["# Layer-wise reconstruction on a 64-Conv YOLO-style detector (320x320, rank 16)", "",
             "`PYTHONPATH=$PWD python benchmarks/bench_reconstruct.py [--impl REV --chains N --label L]`; "
             "see the script's docstring. Errors are relative output errors of each chain against the "
             "original layer (on the fitting samples, as `fits_report` gives them).", "",
             "Wall seconds depend on what else runs on the machine (load average at the end of the run "
             "given); CPU seconds are this process's user + system time over all its threads.", "",
             "| run | CPU | images | chains fitted / total | wall s | CPU s | load | wall s / chain | mean error before | mean error after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in entries:
        fitted = [f for f in e["layers"] if f["error_after"] is not None]
        before = np.mean([f["error_before"] for f in fitted]) if fitted else float("nan")
        after = np.mean([f["error_after"] for f in fitted]) if fitted else float("nan")
        lines.append(f"| {e['label']} | {e['cpu']} | {e['images']} | {e['chains_fitted']} / {e['chains_total']} | "
                     f"{e['seconds']} | {e.get('cpu_seconds', '')} | {e.get('load_average', '')} | {e['seconds_per_chain']} | "
                     f"{before:.4f} | {after:.4f} |")
    labels = [e["label"] for e in entries]
    layers = list(dict.fromkeys(f["layer"] for e in entries for f in e["layers"]))
    lines += ["", "Per layer: error before -> after (samples)", "",
              "| layer | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for layer in layers:
        cells = []
        for e in entries:
            f = next((f for f in e["layers"] if f["layer"] == layer), None)
            cells.append("" if f is None or f["error_after"] is None else
                         f"{f['error_before']:.4f} -> {f['error_after']:.4f} ({f['samples']})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    (RESULTS / "reconstruct.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
