"""Every valid layout of a job on a cluster, predicted and ranked (what `moeyard plan` prints).

The candidates are all degrees (tp, pp, dp, ep folded over dp x cp x tp, and for long rows cp:
`LONG_CONTEXT`) that multiply to the world size and pass the trainer's own validation
(job/layout.py's `check_layout`, applied to a copy of the config), with tp inside a node; interleaved 1F1B
with the virtual stages `virtual_stages` lists (up to one layer per stage); micro-batch counts that divide the
global batch; no, selective and full recomputation; replicated, ZeRO-1, ZeRO-2 or FSDP data parallelism
(parallel.dp_mode). GPipe is left out (it keeps every micro-batch in flight for 1F1B's bubble) unless the
config asks for it. The global batch, sequence length, model and dtype are the config's: the planner answers
"how should these ranks run this job". The ranks are cluster.*'s, else the launcher's (cluster.py `planned_cluster`).

Ranking and the recommendation: ranking.py.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moeyard.job.layout import check_layout
from moeyard.job.schema import ConfigError, JobConfig
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.cluster import planned_cluster
from moeyard.plan.planner import Layout, Planner, Prediction, apply_layout, make_planner
from moeyard.plan.ranking import OK, Ranking, fit_class, rank
from moeyard.plan.timing import Features


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def virtual_stages(n_layers: int, pp: int) -> list[int]:
    """Interleaved 1F1B's stages per rank worth trying on `pp` ranks: every count that splits the layers
    evenly (pp x v divides n_layers, as Megatron requires; up to one layer per stage: VP24 for 48 layers on
    PP2), and the powers of two up to n_layers // pp, whose stages differ by at most one layer
    (parallel/pipeline.py's split), for layer counts with few divisors such as DeepSeek-V3's 61."""
    return [v for v in range(2, n_layers // pp + 1) if n_layers % (pp * v) == 0 or v & (v - 1) == 0]


def enumerate_layouts(cfg: JobConfig, world: int, per_node: int, nodes: int) -> list[Layout]:
    """Every layout of `world` ranks the trainer accepts for this job (module docstring)."""
    m, batch = cfg.model, cfg.train.batch_size
    out = []
    for tp in _divisors(world):
        if nodes > 1 and per_node % tp:
            continue
        for pp in (p for p in _divisors(world // tp) if p <= m.n_layers):
            for cp in _context_degrees(cfg, world // (tp * pp), tp, per_node, nodes):
                out += _valid(cfg, world, tp, pp, cp, batch)
    return out


LONG_CONTEXT = 16384
"""Rows at least this long also try context parallelism (parallel.cp > 1). Shorter rows leave attention's
quadratic share too small for cp to pay its per-layer key/value all-gather, and trying every cp would multiply
the candidates (4x for Mixtral on 32 GPUs); a config that sets parallel.cp is always planned with its cp."""


def _context_degrees(cfg: JobConfig, ranks: int, tp: int, per_node: int, nodes: int) -> list[int]:
    """The cp degrees tried on `ranks` ranks (after tp and pp): 1, the configured cp, and for long rows every
    cp that cuts them into 2 cp equal chunks with cp x tp inside a node (the all-gather runs every layer)."""
    seq, asked = cfg.train.seq_len, cfg.parallel.cp
    long = seq >= LONG_CONTEXT
    within = lambda c: nodes == 1 or per_node % (c * tp) == 0
    return [c for c in _divisors(ranks) if c == 1 or c == asked or (long and seq % (2 * c) == 0 and within(c))]


def _valid(cfg: JobConfig, world: int, tp: int, pp: int, cp: int, batch: int) -> list[Layout]:
    """The variants of degrees (tp, pp, cp) that the trainer accepts, for every ep folding over dp x cp x tp."""
    out, dp = [], world // (tp * pp * cp)
    for ep in (x for x in _divisors(dp * cp * tp) if cfg.moe.num_experts % x == 0):
        for candidate in _variants(cfg, tp, pp, dp, ep, batch, cp):
            try:
                applied = apply_layout(cfg, candidate)
                check_layout(applied, ParallelDims.from_config(applied.parallel, world))
            except ValueError:  # ConfigError included: the layout breaks a rule
                continue
            out.append(candidate)
    return out


def _variants(cfg: JobConfig, tp: int, pp: int, dp: int, ep: int, batch: int, cp: int = 1):
    p = cfg.parallel
    schedules = [("1f1b", 1)]
    if pp > 1:
        stages = virtual_stages(cfg.model.n_layers, pp)
        if p.pp_schedule == "interleaved_1f1b" and pp == p.pp and p.pp_stages_per_rank not in stages:
            stages.append(p.pp_stages_per_rank)  # the config's own layout is always a candidate
        schedules += [("interleaved_1f1b", v) for v in stages]
        if p.pp_schedule == "gpipe":
            schedules.append(("gpipe", 1))
    modes = ["replicate", "zero1", "zero2", "fsdp"] if dp * cp > 1 else ["replicate"]
    for micro in (x for x in _divisors(batch) if (batch // x) % dp == 0 and x >= pp):
        for schedule, vpp in schedules:
            keep = (pp, vpp) == (p.pp, p.pp_stages_per_rank) and p.pp_layers
            for ac in ("none", "selective", "full"):
                for mode in modes:
                    yield Layout(
                        tp=tp,
                        pp=pp,
                        dp=dp,
                        ep=ep,
                        vpp=vpp,
                        micro_batches=micro,
                        ac=ac,
                        dp_mode=mode,
                        schedule=schedule,
                        sp=p.sequence_parallel and tp > 1,
                        pp_layers=tuple(p.pp_layers) if keep else (),
                        cp=cp,
                    )


@dataclass
class PlanResult:
    """The ranked predictions of one `moeyard plan` (ranking.py's order)."""

    planner: Planner
    world: int
    nodes: int
    ranking: Ranking

    @property
    def predictions(self) -> list[Prediction]:
        return self.ranking.predictions

    @property
    def recommended(self) -> list[Prediction]:
        """The first three of the tie group."""
        return self.predictions[: min(3, self.ranking.ties)]

    def position(self, layout: Layout) -> int | None:
        """`layout`'s row in the ranking (1 = first), None when it is not among the candidates."""
        return next((i for i, p in enumerate(self.predictions, start=1) if p.layout == layout), None)

    def fit_class(self, p: Prediction) -> str:
        return fit_class(p, self.ranking.margin)

    @property
    def recommendable(self) -> int:
        return sum(self.fit_class(p) == OK for p in self.predictions)


def plan(cfg: JobConfig, calibration: str | None = None, features: Features | None = None) -> PlanResult:
    """Predicts and ranks every valid layout of `cfg` on its cluster (cluster.*, else the launcher's sizes);
    `features`: another system's overlaps and precision (published.py), else MoEyard's own."""
    cfg = copy.copy(cfg)
    cfg.cluster = planned_cluster(cfg)
    planner = make_planner(cfg, calibration)
    if features is not None:
        planner.features = features
    nodes = cfg.cluster.nodes
    world = nodes * planner.per_node
    layouts = enumerate_layouts(cfg, world, planner.per_node, nodes)
    if not layouts:
        raise ConfigError(
            f"cluster.nodes x gpus_per_node={nodes}x{planner.per_node} admits no layout of this job "
            f"(rule: train.batch_size={cfg.train.batch_size} / micro-batches must divide over dp, and the "
            "model's heads, experts and layers over tp, ep and pp)"
        )
    ranking = rank([planner.predict(layout) for layout in layouts], cfg.cluster.memory_margin)
    return PlanResult(planner, world, nodes, ranking)
