"""A model's outputs against its original's on a real_models.py held-out folder (not part of CI).

    python benchmarks/heldout.py yolov8-nude ORIGINAL.onnx OPTIMISED.onnx [MORE.onnx ...]

For each optimised model: per output, the median over held-out samples of every channel group's
relative error (a detector's box rows and class-score rows apart) and the task agreements of
onnx_cp.runtime.fidelity.compare_output (top-10 anchors, decoded strings, ...). The held-out
folder is the one `real_models.py --fetch-only` makes under --cache.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_models  # noqa: E402


def held_out_report(model: real_models.Model, original: Path, optimised: Path, folder: Path) -> dict:
    xs, _ = real_models.load_folder(model, folder)
    names = [o.name for o in real_models.session(original).get_outputs()]
    reference = real_models.run_all(real_models.session(original), model.input_name, xs)
    candidate = real_models.run_all(real_models.session(optimised), model.input_name, xs)
    return {"samples": len(xs), **real_models.fidelity(reference, candidate, names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("key", choices=[m.key for m in real_models.MODELS])
    parser.add_argument("original", type=Path)
    parser.add_argument("optimised", type=Path, nargs="+")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx-cp-real"))
    args = parser.parse_args()
    model = next(m for m in real_models.MODELS if m.key == args.key)
    folder = real_models.inputs_folder(args.cache, model) / "heldout"
    for path in args.optimised:
        print(path, json.dumps(held_out_report(model, args.original, path, folder)))


if __name__ == "__main__":
    main()
