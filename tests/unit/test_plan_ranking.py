"""What `moeyard plan` considers and what it recommends (plan/layouts.py, plan/ranking.py, plan/cluster.py):

- interleaved 1F1B's virtual stages go up to one layer per stage (VP24 for 48 layers on PP2, the published
  Qwen3-30B-A3B layout), and each count proposed passes the trainer's own check_layout;
- without cluster.*, a GPU experiment is planned on its launcher's nodes and ranks and the GPU kind it names,
  and the command says where the experiment's own layout ranks; with no kind named anywhere, `moeyard plan`
  refuses in one line with exit status 2; cluster.gpu=cpu plans CPU ranks;
- a layout that fits but leaves less than cluster.memory_margin free is "tight" and never recommended;
- layouts within TIME_ERROR of the fastest are ties, ordered by memory headroom, then simplicity.

Run: .venv/bin/pytest -q tests/unit/test_plan_ranking.py
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from moeyard.job.compose import compose
from moeyard.job.layout import check_layout
from moeyard.parallel.dims import ParallelDims
from moeyard.plan import cluster as cluster_mod
from moeyard.plan.cluster import planned_cluster
from moeyard.plan.command import cmd_plan
from moeyard.plan.layouts import enumerate_layouts, virtual_stages
from moeyard.plan.planner import Layout, apply_layout
from moeyard.plan.ranking import NO_FIT, OK, TIGHT, TIME_ERROR, fit_class, rank, simplicity

QWEN3_16 = [
    "model=qwen3_30b_a3b",
    "train.seq_len=4096",
    "train.batch_size=512",
    "train.micro_batches=32",
    "parallel.pp=2",
    "parallel.ep=8",
    "parallel.dp=8",
]
"""Megatron-Bridge's Qwen3-30B-A3B job on 2 x 8 GPUs (plan/published.py), 48 layers."""
GUIDE = Path(__file__).parents[2] / "docs" / "planner.md"


@pytest.fixture
def no_gpu_here(monkeypatch):
    """This machine as one without a GPU, whatever it has (the driver's files list none)."""
    monkeypatch.setattr(cluster_mod, "gpu_names", lambda: [])


def test_virtual_stages_reach_one_layer_per_stage():
    assert virtual_stages(48, 2) == [2, 3, 4, 6, 8, 12, 16, 24]  # even splits, and the powers of two
    assert virtual_stages(61, 4) == [2, 4, 8]  # a prime layer count: powers of two up to 15 layers per rank
    assert virtual_stages(32, 4) == [2, 4, 8] and virtual_stages(4, 4) == []


def test_every_virtual_stage_count_proposed_passes_check_layout():
    cfg = compose(QWEN3_16)
    for pp in (2, 4, 8, 16):
        for v in virtual_stages(cfg.model.n_layers, pp):
            layout = Layout(tp=1, pp=pp, dp=16 // pp, ep=1, vpp=v, micro_batches=32, schedule="interleaved_1f1b")
            applied = apply_layout(cfg, layout)
            check_layout(applied, ParallelDims.from_config(applied.parallel, 16))  # raises if refused
        one_more = cfg.model.n_layers // pp + 1
        layout = Layout(tp=1, pp=pp, dp=16 // pp, ep=1, vpp=one_more, micro_batches=32, schedule="interleaved_1f1b")
        applied = apply_layout(cfg, layout)
        with pytest.raises(ValueError, match="too few for"):
            check_layout(applied, ParallelDims.from_config(applied.parallel, 16))


def test_the_published_vp24_layout_is_enumerated():
    cfg = compose(QWEN3_16)
    layouts = enumerate_layouts(cfg, 16, 8, 2)
    published = Layout(tp=1, pp=2, dp=8, ep=8, vpp=24, micro_batches=32, schedule="interleaved_1f1b")
    assert published in layouts
    assert max(x.vpp for x in layouts if x.pp == 2) == 24


def test_a_gpu_experiment_is_planned_on_its_launcher_and_gpu(no_gpu_here):
    mixtral = planned_cluster(compose(["experiment=mixtral_8x7b_h100"]))
    assert (mixtral.gpu, mixtral.nodes, mixtral.gpus_per_node) == ("h100", 4, 8)
    deepseek = planned_cluster(compose(["experiment=deepseek_v3_h100"]))
    assert (deepseek.gpu, deepseek.nodes, deepseek.gpus_per_node) == ("h100", 32, 8)
    given = planned_cluster(compose(["experiment=mixtral_8x7b_h100", "cluster.nodes=8", "cluster.gpu=h200"]))
    assert (given.gpu, given.nodes, given.gpus_per_node) == ("h200", 8, 8)  # cluster.* wins over the launcher


def test_cpu_ranks_are_planned_when_asked_for(no_gpu_here):
    cpu = planned_cluster(compose(["model=debug", "cluster.gpu=cpu", "launcher.nproc_per_node=2"]))
    assert (cpu.gpu, cpu.nodes, cpu.gpus_per_node) == ("cpu", 1, 2)
    assert planned_cluster(compose(["model=debug", "train.device=cpu"])).gpu == "cpu"


def test_no_device_named_is_refused_in_one_line(no_gpu_here, capsys):
    assert cmd_plan(["model=mixtral_8x7b", "cluster.nodes=2", "cluster.gpus_per_node=8"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    print(err)
    assert captured.out == "" and "\n" not in err
    assert err.startswith("moeyard: config error: cluster.gpu=auto ") and "cluster.gpu=cpu" in err
    assert "cluster.gpu=h100|h200|h800|a100" in err


def test_memory_margin_is_checked(capsys):
    assert cmd_plan(["model=debug", "cluster.gpu=cpu", "cluster.memory_margin=1.5"]) == 2
    assert "cluster.memory_margin=1.5 must be in [0, 1)" in capsys.readouterr().err


@dataclass
class Stub:
    """What ranking.py reads of a Prediction: the layout, the step and the worst rank's share of memory."""

    layout: Layout
    step_s: float
    used: float
    """Peak over usable memory."""

    @property
    def time(self):
        return SimpleNamespace(total=self.step_s)

    @property
    def worst(self):
        return SimpleNamespace(total=self.used)

    @property
    def headroom(self) -> float:
        return 1 - self.used

    @property
    def fits(self) -> bool:
        return self.used <= 1


def test_margin_and_ties_order_the_recommendation():
    plain, dp = Layout.single(), Layout.single(dp=2)
    busy = Layout(tp=2, pp=2, dp=2, ep=2, micro_batches=2)
    p = {
        "tight, fastest": Stub(plain, 1.00, 0.95),  # fits, but inside the 10% margin: not recommended
        "best": Stub(busy, 1.10, 0.83),  # the fastest that leaves the margin: the bar is 1.10 x 1.15 = 1.265
        "roomiest": Stub(busy, 1.20, 0.58),  # 42% free
        "simple": Stub(dp, 1.24, 0.64),  # 36% free: the same 5% step of headroom as "busy"
        "busy": Stub(busy, 1.25, 0.63),  # 37% free
        "slow": Stub(plain, 1.30, 0.50),  # out of the band, however roomy
        "over": Stub(plain, 0.90, 1.20),
        "less over": Stub(plain, 2.00, 1.10),
    }
    assert [fit_class(x, 0.10) for x in p.values()] == [TIGHT, OK, OK, OK, OK, OK, NO_FIT, NO_FIT]
    ranking = rank(list(p.values()), margin=0.10)
    names = {id(x): name for name, x in p.items()}
    order = [names[id(x)] for x in ranking.predictions]
    assert ranking.ties == 4 and ranking.best_s == 1.10 and 1.25 <= 1.10 * (1 + TIME_ERROR) < 1.30
    assert order == ["roomiest", "simple", "busy", "best", "slow", "tight, fastest", "less over", "over"]


def test_simplicity_counts_dims_then_stages_then_fsdp_then_recomputation():
    single = Layout.single()
    assert simplicity(single) < simplicity(Layout.single(dp=2)) < simplicity(Layout.single(dp=2, tp=2))
    assert simplicity(Layout.single(pp=2)) < simplicity(Layout.single(pp=2, vpp=2, schedule="interleaved_1f1b"))
    assert simplicity(Layout.single(dp=2)) < simplicity(Layout.single(dp=2, dp_mode="fsdp"))
    assert simplicity(single) < simplicity(Layout.single(ac="selective")) < simplicity(Layout.single(ac="full"))


def test_a_gpu_experiment_plans_without_cluster_and_its_rank_is_explained(no_gpu_here, capsys):
    """The shipped experiment ranks in the top ten on its own cluster, or the planner guide says why not."""
    assert cmd_plan(["experiment=mixtral_8x7b_h100", "--top", "10"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert out.startswith("moeyard plan: mixtral_8x7b on 4 node(s) x 8 H100 SXM 80GB (32 ranks)")
    row = int(re.search(r"^configured layout tp2 pp4 ep8 dp4 fsdp m32 ac:full: row (\d+) of", out, re.M)[1])
    rows = [line for line in out.splitlines() if re.match(r"^ +\d+  ", line)]
    fits = [line[49:54].strip() for line in rows]  # the `fits` column: after "{#:>4}  {layout:<42} "
    assert len(rows) == 10 and fits[:3] == ["yes"] * 3  # the recommended leave the margin
    if row > 10:
        assert "`mixtral_8x7b_h100` ranks" in GUIDE.read_text(), "docs/planner.md must say why it is not in the top ten"
