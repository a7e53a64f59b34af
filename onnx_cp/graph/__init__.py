"""The graph side: Conv sites and their eligibility, plans, and the pass that splices low-rank chains
(CP, Tucker-2, channel SVD, spatial SVD).

    sites = find_conv_sites(model)                 # every Conv, with its refusal reason if any
    plan = plan_with(sites, rank_for, decomposer)  # or a plan from onnx_cp.ranks; form="svd", ...
    result = CPConvPass(plan)(model)               # result.outcomes: one row per Conv
"""

from onnx_cp.graph.passes import ChainPassResult, CPConvPass, LayerOutcome, LowRankPass
from onnx_cp.graph.plan import LayerPlan, Plan, plan_with
from onnx_cp.graph.sites import ConvSite, conv_attributes, filter_sites, find_conv_sites

__all__ = ["CPConvPass", "ChainPassResult", "ConvSite", "LayerOutcome", "LayerPlan", "LowRankPass", "Plan",
           "conv_attributes", "filter_sites", "find_conv_sites", "plan_with"]
