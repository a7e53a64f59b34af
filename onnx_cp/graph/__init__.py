"""The graph side: Conv sites and their eligibility, plans, and the passes that splice chains.

    sites = find_conv_sites(model)                 # every Conv, with its refusal reason if any
    plan = plan_with(sites, rank_for, decomposer)  # or a plan from onnx_cp.ranks
    result = CPConvPass(plan)(model)               # result.outcomes: one row per Conv
"""

from onnx_cp.graph.cp_chain import ChainPassResult, CPConvPass, LayerOutcome
from onnx_cp.graph.plan import LayerPlan, Plan, plan_with
from onnx_cp.graph.sites import ConvSite, conv_attributes, filter_sites, find_conv_sites

__all__ = ["CPConvPass", "ChainPassResult", "ConvSite", "LayerOutcome", "LayerPlan", "Plan", "conv_attributes",
           "filter_sites", "find_conv_sites", "plan_with"]
