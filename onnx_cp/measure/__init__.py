"""Measuring models: onnxruntime latency and per-layer profiles, accuracy, FLOPs, reports."""

from onnx_cp.measure.accuracy import AccuracyResult, evaluate
from onnx_cp.measure.flops import count_flops
from onnx_cp.measure.latency import LatencyResult, ModelLatency, benchmark_latency, format_table
from onnx_cp.measure.profile import LayerProfile, LayerTime, format_profile, layer_profile
from onnx_cp.measure.report import write_json, write_report

__all__ = [
    "AccuracyResult",
    "LatencyResult",
    "LayerProfile",
    "LayerTime",
    "ModelLatency",
    "benchmark_latency",
    "count_flops",
    "evaluate",
    "format_profile",
    "format_table",
    "layer_profile",
    "write_json",
    "write_report",
]
