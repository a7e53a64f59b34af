"""Which layers get which ranks: the policies (typed values), the one rank grid, the error budget,
the latency model, and the searches under a speed-up or accuracy budget. Every function here returns
a graph Plan; nothing is written onto the sites."""

from onnx_cp.ranks.policy import (
    DEFAULT_MAX_ERROR,
    AccuracyBudget,
    ErrorBudget,
    ExplicitRanks,
    OutputErrorBudget,
    RankPolicy,
    SpeedupTarget,
    as_policy,
)
from onnx_cp.ranks.solve import SolverSettings

__all__ = ["DEFAULT_MAX_ERROR", "AccuracyBudget", "ErrorBudget", "ExplicitRanks", "OutputErrorBudget", "RankPolicy",
           "SolverSettings", "SpeedupTarget", "as_policy"]
