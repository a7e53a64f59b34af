"""Which layers, which ranks.

Explicit ranks (`--rank N`, `--rank LAYER=N`) are clipped to each layer's FLOP break-even.
Without one, the default picks per layer the smallest rank on onnxruntime's preferred channel grid
whose relative error stays within `max_error`, among ranks that at least halve the layer's MACs; a
layer where no such rank exists is left alone, with the reason. The error is the kernel's (no data
needed) or, given an `ErrorOf` measured on sample inputs, the layer output's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from onnx_cp.errors import UsageError
from onnx_cp.rewrite import ConvSite

# A kernel error budget that keeps outputs close without data: layer outputs move by about the
# kernel error, and errors compound across layers (a fixed rank 32 everywhere changed 93% of an
# OCR model's decoded strings).
DEFAULT_MAX_ERROR = 0.15
# The automatic policy only takes ranks that at least halve a layer's MACs: four small convs
# have overheads that FLOPs do not show.
MIN_AUTO_FLOP_GAIN = 2.0

# solve_many([(kernel, rank), ...], quick=False) -> [result with .factors and .rel_error]; quick
# asks for a cheap estimate (a few ALS sweeps), used to screen and search before the full solve.
SolveMany = Callable[..., Sequence[object]]
SCREEN_MARGIN = 0.05  # how much better than a quick estimate a full solve may do
# error_of(site, per-group solver results) -> relative error of the layer (kernel or output).
ErrorOf = Callable[[ConvSite, Sequence[object]], float]


@dataclass
class RankRequest:
    rank: int | None = None
    per_layer: dict[str, int] = field(default_factory=dict)
    max_error: float = DEFAULT_MAX_ERROR


@dataclass
class RankChoice:
    rank: int
    results: list  # one solver result per group
    note: str | None = None


def parse_rank_args(values: Sequence[str] | None) -> RankRequest:
    """`--rank 32` and/or `--rank conv2=64` (repeatable)."""
    request = RankRequest()
    for value in values or []:
        layer, sep, number = value.rpartition("=")
        rank = _positive_int(number, value)
        if sep:
            if not layer:
                raise UsageError(f"--rank {value!r}: expected N or LAYER=N")
            request.per_layer[layer] = rank
        elif request.rank is not None:
            raise UsageError("--rank N given twice; use LAYER=N for per-layer ranks")
        else:
            request.rank = rank
    return request


def check_layer_names(request: RankRequest, sites: Sequence[ConvSite]) -> None:
    names = {site.name for site in sites}
    unknown = sorted(set(request.per_layer) - names)
    if unknown:
        raise UsageError(f"--rank names unknown Conv layer(s) {unknown}; Conv layers are {sorted(names)}")


def preferred_channel_block() -> int:
    """onnxruntime's NCHWc block: depthwise stages are ~3x faster at multiples of it."""
    flags = _cpu_flags()
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return 4


def plan_ranks(
    sites: Sequence[ConvSite],
    request: RankRequest,
    solve_many: SolveMany,
    error_of: ErrorOf | None = None,
) -> dict[str, RankChoice]:
    """Ranks and solver results for the eligible sites; sets `site.reason` on those left alone.
    error_of: what the automatic policy bounds by `request.max_error` (default: kernel error)."""
    fixed: dict[str, int] = {}
    automatic: list[ConvSite] = []
    notes: dict[str, str] = {}
    unique = _unique_weights(sites)
    for site in unique:
        wanted = request.per_layer.get(site.name, request.rank)
        if wanted is None:
            automatic.append(site)
            continue
        ceiling = site.breakeven_rank()
        if ceiling < 1:
            site.reason = "no rank saves FLOPs on this layer"
        elif wanted > ceiling:
            fixed[site.name] = ceiling
            notes[site.name] = f"rank {wanted} clipped to {ceiling} (FLOP break-even)"
        else:
            fixed[site.name] = wanted
    choices = _solve_fixed(sites, fixed, solve_many, notes)
    measure = _Measure(error_of or combined_error, "kernel error" if error_of is None else "output error")
    choices.update(_search_automatic(automatic, request.max_error, solve_many, measure))
    _share_choices(sites, unique, choices)
    return choices


def solve_layers(layers: Sequence[tuple[ConvSite, int]], solve_many: SolveMany,
                 quick: bool = False) -> dict[tuple[str, int], list]:
    """Decompose each (site, rank), every group of each site, in one solver batch; the
    per-group results come back keyed by (layer name, rank)."""
    jobs = [(site.name, rank, kernel) for site, rank in layers for kernel in site.group_kernels()]
    pairs = [(kernel, rank) for _, rank, kernel in jobs]
    results = solve_many(pairs, quick=True) if quick else solve_many(pairs)
    grouped: dict[tuple[str, int], list] = {}
    for (name, rank, _), result in zip(jobs, results):
        grouped.setdefault((name, rank), []).append(result)
    return grouped


def _solve_fixed(sites, fixed: Mapping[str, int], solve_many: SolveMany, notes) -> dict[str, RankChoice]:
    by_name = {s.name: s for s in sites}
    solved = solve_layers([(by_name[name], rank) for name, rank in fixed.items()], solve_many)
    return {name: RankChoice(rank, solved[(name, rank)], notes.get(name)) for name, rank in fixed.items()}


@dataclass
class _Measure:
    error_of: ErrorOf
    what: str  # "kernel error" / "output error", for the report


def _search_automatic(sites: Sequence[ConvSite], max_error: float, solve_many: SolveMany,
                      measure: _Measure) -> dict[str, RankChoice]:
    """Per layer, the smallest candidate rank whose error meets the budget.

    Cheap first: a few ALS sweeps ("quick") at the top candidate screen out layers no rank can
    serve (3x3 kernels usually), a quick bisection finds the rank, and only the chosen rank is
    solved in full (stepping up when the full solve misses the budget). Layers go in lockstep,
    so that every round is one parallel batch."""
    candidates = {s.name: _auto_candidates(s) for s in sites}
    by_name = {s.name: s for s in sites}
    for site in sites:
        if not candidates[site.name]:
            site.reason = f"no rank gives at least {MIN_AUTO_FLOP_GAIN:g}x fewer MACs"
    top = {n: len(c) - 1 for n, c in candidates.items() if c}
    screened = _errors(by_name, candidates, top, solve_many, measure, quick=True)
    for name, (error, _) in screened.items():
        if error > max_error + SCREEN_MARGIN:
            by_name[name].reason = (f"{measure.what} about {error:.2f} at rank {candidates[name][-1]}, the largest "
                                    f"rank that halves its MACs, exceeds the budget {max_error:g}")
    chosen = _quick_bisection(by_name, candidates, {n: i for n, i in top.items() if by_name[n].eligible},
                              max_error, solve_many, measure)
    best: dict[str, RankChoice] = {}
    while chosen:
        full = _errors(by_name, candidates, chosen, solve_many, measure, quick=False)
        retry = {}
        for name, (error, results) in full.items():
            if error <= max_error:
                best[name] = RankChoice(candidates[name][chosen[name]], results,
                                        f"smallest grid rank with {measure.what} {error:.3f} <= {max_error:g}")
            elif chosen[name] + 1 < len(candidates[name]):
                retry[name] = chosen[name] + 1
            else:
                by_name[name].reason = (f"{measure.what} {error:.3f} at rank {candidates[name][-1]}, the largest "
                                        f"rank that halves its MACs, exceeds the budget {max_error:g}")
        chosen = retry
    return best


def _quick_bisection(by_name, candidates, tops: dict[str, int], max_error: float, solve_many,
                     measure: _Measure) -> dict[str, int]:
    """Smallest candidate index whose quick error meets the budget (the top when none does)."""
    chosen = dict(tops)
    bounds = {name: [0, top - 1] for name, top in tops.items() if top > 0}
    while bounds:
        probes = {name: (lo + hi) // 2 for name, (lo, hi) in bounds.items()}
        for name, (error, _) in _errors(by_name, candidates, probes, solve_many, measure, quick=True).items():
            lo, hi = bounds[name]
            if error <= max_error:
                chosen[name], hi = probes[name], probes[name] - 1
            else:
                lo = probes[name] + 1
            if lo > hi:
                del bounds[name]
            else:
                bounds[name] = [lo, hi]
    return chosen


def _errors(by_name, candidates, index: dict[str, int], solve_many, measure: _Measure,
            quick: bool) -> dict[str, tuple[float, list]]:
    """Error and per-group results of each named layer at its candidate rank `index`."""
    ranks = {name: candidates[name][i] for name, i in index.items()}
    solved = solve_layers([(by_name[name], rank) for name, rank in ranks.items()], solve_many, quick)
    return {name: (measure.error_of(by_name[name], solved[(name, rank)]), solved[(name, rank)])
            for name, rank in ranks.items()}


def _auto_candidates(site: ConvSite) -> list[int]:
    """Ranks worth trying: multiples of the channel block (finer steps for small layers)."""
    ceiling = (site.macs_before() // MIN_AUTO_FLOP_GAIN) // max(site.macs_after(1), 1)
    ceiling = int(ceiling)
    if ceiling < 1:
        return []
    block = preferred_channel_block()
    step = block if ceiling >= block else 1
    return list(range(step, ceiling + 1, step))


def combined_error(site: ConvSite, group_results: Sequence[object]) -> float:
    """Relative error over the whole kernel from the per-group relative errors."""
    squares = sum(
        (r.rel_error * float((k ** 2).sum()) ** 0.5) ** 2
        for r, k in zip(group_results, site.group_kernels())
    )
    total = float((site.kernel.astype(float) ** 2).sum())
    return (squares / total) ** 0.5 if total > 0 else 0.0


def _unique_weights(sites: Sequence[ConvSite]) -> list[ConvSite]:
    """Eligible sites, one per shared weight (the first Conv that uses it)."""
    seen, unique = set(), []
    for site in sites:
        if site.eligible and id(site.node.inputs[1]) not in seen:
            seen.add(id(site.node.inputs[1]))
            unique.append(site)
    return unique


def _share_choices(sites: Sequence[ConvSite], unique: Sequence[ConvSite], choices: dict[str, RankChoice]) -> None:
    """Convs that share a weight share its choice (and its fate)."""
    first_by_weight = {id(s.node.inputs[1]): s for s in unique}
    for site in sites:
        if not site.eligible or site.name in choices:
            continue
        first = first_by_weight.get(id(site.node.inputs[1]))
        if first is not None and first.name in choices:
            choices[site.name] = choices[first.name]
        elif first is not None:
            site.reason = first.reason


def _positive_int(text: str, context: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--rank {context!r}: {text!r} is not an integer") from None
    if value < 1:
        raise UsageError(f"--rank {context!r}: rank must be at least 1")
    return value


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


__all__ = [
    "DEFAULT_MAX_ERROR", "RankChoice", "RankRequest", "check_layer_names", "parse_rank_args",
    "plan_ranks", "preferred_channel_block",
]
