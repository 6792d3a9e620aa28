"""Every valid layout of a job on a cluster, predicted and ranked (what `moeyard plan` prints).

The candidates are all degrees that multiply to the world size and pass the trainer's own validation
(launch/validate.py's layout rules, applied to a copy of the config), with tp inside a node; interleaved
1F1B with 2, 4, 8 or 16 virtual stages per rank; micro-batch counts that divide the global batch; no,
selective and full recomputation; FSDP or replicated data parallelism. GPipe is left out (it keeps every
micro-batch in flight for 1F1B's bubble) unless the config asks for it. The global batch, sequence length,
model and dtype are the config's: the planner answers "how should these ranks run this job".

Ranking: layouts that fit first, fastest first (predicted tokens/s); then the ones that do not fit, least
over the limit first.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeyard.job.layout import check_layout
from moeyard.job.schema import JobConfig
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.planner import Layout, Planner, Prediction, apply_layout, make_planner


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(cfg: JobConfig, world: int, per_node: int, nodes: int) -> list[Layout]:
    """Every layout of `world` ranks the trainer accepts for this job (module docstring)."""
    m, e, batch = cfg.model, cfg.moe, cfg.train.batch_size
    out = []
    for tp in _divisors(world):
        if nodes > 1 and per_node % tp:
            continue
        for pp in (p for p in _divisors(world // tp) if p <= m.n_layers):
            dp = world // (tp * pp)
            for ep in (x for x in _divisors(dp * tp) if e.num_experts % x == 0):
                for candidate in _variants(cfg, tp, pp, dp, ep, batch):
                    try:
                        applied = apply_layout(cfg, candidate)
                        check_layout(applied, ParallelDims.from_config(applied.parallel, world))
                    except ValueError:  # ConfigError included: the layout breaks a rule
                        continue
                    out.append(candidate)
    return out


def _variants(cfg: JobConfig, tp: int, pp: int, dp: int, ep: int, batch: int):
    p = cfg.parallel
    schedules = [("1f1b", 1)]
    if pp > 1:
        schedules += [("interleaved_1f1b", v) for v in (2, 4, 8, 16) if pp * v <= cfg.model.n_layers]
        if p.pp_schedule == "gpipe":
            schedules.append(("gpipe", 1))
    modes = ["replicate", "fsdp"] if dp > 1 else ["replicate"]
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
                    )


def rank_key(p: Prediction) -> tuple:
    return (not p.fits, -p.tokens_per_s if p.fits else p.worst.total)


@dataclass
class PlanResult:
    """The ranked predictions of one `moeyard plan`."""

    planner: Planner
    world: int
    nodes: int
    predictions: list[Prediction]

    @property
    def recommended(self) -> list[Prediction]:
        return [p for p in self.predictions if p.fits][:3]


def plan(cfg: JobConfig, calibration: str | None = None) -> PlanResult:
    """Predicts and ranks every valid layout of `cfg` on `cfg.cluster`."""
    planner = make_planner(cfg, calibration)
    nodes = cfg.cluster.nodes
    world = nodes * planner.per_node
    layouts = enumerate_layouts(cfg, world, planner.per_node, nodes)
    if not layouts:
        raise ValueError(
            f"cluster.nodes x gpus_per_node={nodes}x{planner.per_node} admits no layout of this job "
            f"(rule: train.batch_size={cfg.train.batch_size} / micro-batches must divide over dp, and the "
            "model's heads, experts and layers over tp, ep and pp)"
        )
    predictions = sorted((planner.predict(layout) for layout in layouts), key=rank_key)
    return PlanResult(planner, world, nodes, predictions)
