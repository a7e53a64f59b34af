"""write_report renders whatever parts a report has; files are complete and PNGs valid."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from onnx_cp.errors import OnnxCpError
from onnx_cp.measure import write_report
from onnx_cp.measure.report import normalize


def _profile(ms_conv2):
    layers = [{"name": n, "ms": ms, "share": 0.0, "ops": ["Conv"], "kernels": [n]}
              for n, ms in (("conv1", 0.02), ("conv2", ms_conv2), ("fc", 0.01), ("(reorder)", 0.005))]
    return {"kind": "profile", "name": "m", "threads": 1, "batch": 1, "runs": 5,
            "total_ms": sum(layer["ms"] for layer in layers), "layers": layers}


def _latency():
    def model(name, median):
        return {"name": name, "path": f"{name}.onnx", "median_ms": median, "p10_ms": median * 0.9,
                "p90_ms": median * 1.2, "runs": 10, "ratio_to_first": median / 0.2,
                "speedup_vs_first": 0.2 / median}
    return {"kind": "latency", "models": [model("original", 0.2), model("optimized", 0.07)],
            "threads": 1, "batch": 1, "runs": 10, "warmup": 2, "optimization": "all",
            "onnxruntime": "1.x"}


def _optimize_report(**extra):
    report = {
        "input": "in.onnx", "output": "out.onnx",
        "layers": [
            {"name": "conv1", "kernel_shape": [16, 3, 3, 3], "group": 1, "rank": None,
             "rel_error": None, "macs_before": 110592, "macs_after": 110592, "params_before": 432,
             "params_after": 432, "status": "skipped", "reason": "no gain | tiny"},
            {"name": "conv2", "kernel_shape": [32, 16, 5, 5], "group": 1, "rank": 16,
             "rel_error": 0.4, "macs_before": 3276800, "macs_after": 237568,
             "params_before": 12800, "params_after": 928, "status": "decomposed", "reason": None},
        ],
        "totals": {"macs_before": 3387392, "macs_after": 348160, "params_before": 13232,
                   "params_after": 1360},
        "verification": {"max_abs_error": 1e-3, "passed": True},
    }
    report.update(extra)
    return report


def _check_pngs(paths):
    pngs = [p for p in paths if p.suffix == ".png"]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"
        with Image.open(png) as image:
            assert image.size[0] > 300 and image.size[1] > 150
    return sorted(p.name for p in pngs)


def test_full_optimize_report(tmp_path):
    accuracy = {"original": {"n": 100, "top1": 0.91, "top5": 0.99},
                "decomposed": {"n": 100, "top1": 0.6, "top5": 0.9, "agreement_top1": 0.62,
                               "max_abs_error": 2.5},
                "finetuned": {"n": 100, "top1": 0.9, "top5": 0.99}}
    report = _optimize_report(latency=_latency(),
                              profile={"before": _profile(0.16), "after": _profile(0.05)},
                              accuracy=accuracy)
    paths = write_report(report, tmp_path / "new" / "dir", kind="optimize")
    names = {p.name for p in paths}
    assert {"report.json", "report.md"} <= names
    assert _check_pngs(paths) == ["accuracy_vs_speedup.png", "latency.png", "layer_latency.png",
                                  "layer_macs.png"]
    assert json.loads((tmp_path / "new" / "dir" / "report.json").read_text()) == report
    md = (tmp_path / "new" / "dir" / "report.md").read_text()
    for section in ("## Totals", "## Layers", "## Verification", "## Latency",
                    "## Per-layer latency", "## Accuracy", "![layer_latency](layer_latency.png)"):
        assert section in md
    assert "no gain \\| tiny" in md  # table cells escaped
    assert "9.73x" in md  # MAC reduction
    assert not list((tmp_path / "new" / "dir").glob(".*"))  # no temporary files left


def test_subset_without_measurements(tmp_path):
    paths = write_report(_optimize_report(), tmp_path, kind="optimize")
    assert _check_pngs(paths) == ["layer_macs.png"]
    md = (tmp_path / "report.md").read_text()
    assert "## Latency" not in md and "## Accuracy" not in md


def test_accuracy_without_latency_uses_mac_reduction(tmp_path):
    report = _optimize_report(accuracy={"original": {"n": 5, "top1": 0.8},
                                        "decomposed": {"n": 5, "top1": 0.6}})
    assert "accuracy_vs_speedup.png" in _check_pngs(write_report(report, tmp_path, kind="optimize"))


def test_totals_pairs_any_before_after_keys_and_nested_verification(tmp_path):
    report = _optimize_report(
        totals={"convs": 2, "conv_macs_before": 3000, "conv_macs_after": 1000},
        verification={"checker": "passed", "notes": [], "outputs": {"y": {"max_abs_error": 0.5}}},
        settings={"rank": 16, "layers": None}, accuracy={"original": {"n": 5, "top1": 0.8},
                                                          "decomposed": {"n": 5, "top1": 0.6}})
    paths = write_report(report, tmp_path, kind="optimize")
    md = (tmp_path / "report.md").read_text()
    assert "| Conv MACs | 3,000 | 1,000 | 3.00x |" in md and "convs: 2" in md
    assert "| outputs.y.max_abs_error | 0.5 |" in md and "rank=16" in md
    assert "accuracy_vs_speedup.png" in _check_pngs(paths)


def test_finetune_history_table(tmp_path):
    history = [{"epoch": 0, "val_top1": 0.5, "train_loss": None},
               {"epoch": 1, "val_top1": 0.8, "train_loss": 0.3, "lr": 0.01}]
    write_report(_optimize_report(finetune={"history": history, "best_epoch": 1}), tmp_path, kind="optimize")
    md = (tmp_path / "report.md").read_text()
    assert "## Fine-tuning" in md and "best_epoch: 1" in md
    assert "| epoch | val_top1 | train_loss | lr |" in md and "| 1 | 0.8 | 0.3 | 0.01 |" in md


def test_wall_time_by_stage_table(tmp_path):
    stages = {"rank choice": 30.0, "reconstruction and fine-tuning": 10.0}
    write_report(_optimize_report(stage_seconds=stages, seconds=50.0), tmp_path, kind="optimize")
    md = (tmp_path / "report.md").read_text()
    assert "## Wall time by stage" in md
    assert "| rank choice | 30.0 | 60% |" in md and "| reconstruction and fine-tuning | 10.0 | 20% |" in md


def test_bench_json_with_profiles(tmp_path):
    bench = {**_latency(), "profile": {"original": _profile(0.16), "optimized": _profile(0.05)}}
    assert set(normalize(bench, "bench")) == {"latency", "profile"}
    assert _check_pngs(write_report(bench, tmp_path, kind="bench")) == ["latency.png", "layer_latency.png"]


def test_eval_json(tmp_path):
    result = {"kind": "accuracy", "model": "m.onnx", "data": "d.npz", "n": 10, "top1": 0.5,
              "top5": 0.9, "agreement_top1": 0.8, "max_abs_error": 0.1, "reference": "r.onnx",
              "reference_top1": 0.6, "reference_top5": 1.0}
    paths = write_report(result, tmp_path, kind="eval")
    assert _check_pngs(paths) == []  # one model: nothing to plot against
    md = (tmp_path / "report.md").read_text()
    assert "| m | 10 | 50.00% | 90.00% | 80.00% | 0.1 |" in md
    assert "| reference: r | 10 | 60.00% | 100.00% | - | - |" in md


def test_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OnnxCpError, match="report folder"):
        write_report(_optimize_report(), tmp_path / "file", kind="optimize")


def test_labels_of_points_at_one_speedup_are_moved_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from onnx_cp.measure.plots import LABEL_GAP_POINTS, _label_offsets

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    xs, ys = [1.0, 9.0, 9.0, 9.0], [96.4, 81.2, 94.5, 95.4]
    ax.set_xlim(0, 12)
    ax.set_ylim(75, 100)
    offsets = _label_offsets(ax, xs, ys, x_span=8.0)
    per_unit = ax.get_window_extent().height * 72 / fig.dpi / 25
    centres = [y * per_unit + o for y, o in zip(ys, offsets)]
    assert centres[3] - centres[2] >= LABEL_GAP_POINTS - 1e-6  # fine-tuned above reconstructed
    assert offsets[0] == 0 and offsets[3] == 0 and offsets[1] == 0  # far apart: left where they are
    plt.close(fig)
