"""Step time of a layout: compute from FLOPs and bytes, communication from volumes, the pipeline's bubble.

Per rank and micro-batch, each block's forward is
    GEMM FLOPs / (peak x gemm_eff) + causal attention FLOPs / (peak x attn_eff) + bytes / (HBM x mem_eff)
with every FLOP split as the layout splits it (tp for attention, the dense FFN and the vocabulary; each tp rank
routes 1/tp of the tokens; a rank runs the experts on the rows it receives). Backward costs twice the
forward's GEMMs and memory traffic and 2.5 times its attention; a checkpointed block runs its forward again.
Each block and micro-batch also pays `layer_s` (launches, host syncs), each step `step_s`.

Communication, over the bandwidth of the link the group spans (NVLink inside a node, InfiniBand between
nodes, gloo over loopback on a CPU; ranks are numbered pp-major, then dp, then tp, as parallel/dims.py builds
its meshes, with `gpus_per_node` consecutive ranks per node):
    TP     per block: the attention and dense-FFN outputs all-reduced (reduce-scatter + all-gather with
           sequence parallelism, the same volume), an MoE layer's output all-gathered without it; backward
           the same again
    EP     per MoE block: dispatch and combine all-to-alls of the rows sent, forward and backward; the share
           addressed to ranks on other nodes travels over InfiniBand, concurrently with the rest
    PP     per micro-batch and stage boundary: the hidden state forward, its gradient backward
    DP     replicate: gradients all-reduced once per step after backward (dense over dp, experts over edp);
           FSDP: each block's parameters gathered in forward and backward and its gradients reduce-scattered,
           every micro-batch, prefetched so that only what exceeds the block's compute shows
Ring collectives move 2(n-1)/n (all-reduce) or (n-1)/n (the others) of the bytes per rank.

Pipeline: 1F1B and GPipe take (m + pp - 1) micro-batch slots of the slowest stage; interleaved 1F1B
(m + (pp - 1) / v) slots of a rank's v chunks; the difference to m slots is the bubble. Overlap: FSDP's
prefetching, and, where `Features` says so (the published systems), all-to-all, pipeline sends and gradient
reduction hidden behind compute.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import ceil, log2

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.config import ParallelConfig
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import RankMemory
from moeyard.parallel.pipeline import local_stage_ids, stage_layer_ranges
from moeyard.plan.activations import FP32, Shape, routed_rows
from moeyard.plan.calibration import Calibration
from moeyard.plan.memory import checkpointed, signature
from moeyard.profiling.devices import DeviceSpec


@dataclass(frozen=True)
class Features:
    """What the training system does beyond MoEyard (for the published comparison; all off for MoEyard)."""

    overlap_ep: bool = False
    """All-to-alls hidden behind other micro-batches' compute (DeepSeek's DualPipe)."""
    overlap_pp: bool = False
    """Pipeline sends hidden behind compute."""
    overlap_dp: bool = False
    """Gradient reduction overlapped with the last micro-batch's backward (Megatron --overlap-grad-reduce)."""
    dualpipe: bool = False
    """DualPipe's bubble, (pp/2 - 1) micro-batch slots instead of 1F1B's pp - 1."""
    fp8: bool = False
    """GEMMs at the FP8 peak (DeepSeek-V3's FP8 training)."""
    dedup_ib: bool = False
    """A token crosses InfiniBand once per destination node, then fans out over NVLink (DeepEP)."""
    comm_sms: float = 0.0
    """Fraction of the GPU's SMs that communication kernels take while they overlap compute."""
    mtp_depth: int = 0
    """Multi-token prediction modules on the last stage: one more block and output head per token each."""
    fused_permute: bool = False
    """Token permutation fused into few kernels (Megatron's --moe-permute-fusion, DeepEP)."""


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one step on the slowest rank, by part."""

    compute: float
    """Forward, backward and recomputation of m micro-batches."""
    tp: float
    """Tensor-parallel collectives, and context parallelism's key/value all-gathers and reduce-scatters."""
    ep: float
    pp: float
    dp: float
    """Exposed communication of each kind."""
    bubble: float
    optimizer: float
    overhead: float

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.ep + self.pp + self.dp + self.bubble + self.optimizer + self.overhead


@dataclass(frozen=True)
class Topology:
    """Where a layout's groups sit: ranks per node, and the device and its efficiencies."""

    ranks_per_node: int
    device: DeviceSpec
    cal: Calibration
    bf16: bool
    features: Features = Features()

    def link(self, ranks: list[int], kind: str = "all_reduce") -> tuple[float, float]:
        """(bytes/s, latency) of a collective of `kind` over `ranks`: InfiniBand if they span nodes, else
        NVLink (or, on a CPU, gloo's measured rate of that kind of collective)."""
        G, d = self.ranks_per_node, self.device
        if len({r // G for r in ranks}) > 1:
            return d.inter_gbps * 1e9, d.inter_latency_s
        return dict(d.collective_gbps).get(kind, d.intra_gbps) * 1e9, d.intra_latency_s

    def ring(self, ranks: list[int], nbytes: float, kind: str) -> float:
        """A ring all_reduce, all_gather or reduce_scatter of `nbytes` (the whole buffer) over `ranks`."""
        n = len(ranks)
        if n == 1 or nbytes == 0:
            return 0.0
        bw, lat = self.link(ranks, kind)
        rounds = 2 if kind == "all_reduce" else 1
        return rounds * (n - 1) / n * nbytes / (bw * self.cal.coll_eff) + rounds * ceil(log2(n)) * lat

    def all_to_all(self, ranks: list[int], nbytes: float, inter_scale: float = 1.0) -> float:
        """`nbytes` leaving each rank, spread evenly over the group (its own share stays); `inter_scale`
        scales what crosses nodes (node-level deduplication)."""
        n = len(ranks)
        if n == 1 or nbytes == 0:
            return 0.0
        G, d, eff = self.ranks_per_node, self.device, self.cal.a2a_eff
        local = sum(1 for r in ranks if r // G == ranks[0] // G)
        intra = nbytes * (local - 1) / n / (self.link(ranks[:local], "all_to_all")[0] * eff)
        inter = inter_scale * nbytes * (n - local) / n / (d.inter_gbps * 1e9 * eff)
        return max(intra, inter) + (d.inter_latency_s if n > local else d.intra_latency_s)

    @property
    def matmul_tflops(self) -> float:
        d = self.device
        return d.peak_tflops if self.bf16 or d.name == "cpu" else d.fp32_tflops


@dataclass(frozen=True)
class Rates:
    """Achieved rates: FLOP/s of the blocks' linear layers, of other matmuls (router, output head), of the
    attention core; bytes/s of memory-bound work."""

    linear: float
    gemm: float
    attention: float
    memory: float


def _rates(topo: Topology) -> Rates:
    d, c, f = topo.device, topo.cal, topo.features
    share = 1.0 - f.comm_sms  # the SMs left to compute while communication kernels run alongside
    gemm = topo.matmul_tflops * 1e12 * c.gemm_eff * share
    linear = d.fp8_tflops * 1e12 * c.gemm_eff * share if f.fp8 and d.fp8_tflops else gemm
    return Rates(linear, gemm, d.peak_tflops * 1e12 * c.attn_eff * share, d.hbm_gbps * 1e9 * c.mem_eff * share)


def attention_work(m: ModelConfig, s: Shape) -> tuple[float, float, float]:
    """Forward (GEMM FLOPs, causal attention FLOPs, bytes moved) of one block's attention on one rank."""
    T, S, D, tp, b = s.tokens, s.seq, m.dim, s.tp, s.act
    if getattr(m, "attention", "gqa") == "mla":
        H = m.n_heads // tp
        Q, L, R, N, Vd = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
        q = 2 * T * (D * Q + Q * H * (N + R)) if Q else 2 * T * D * H * (N + R)
        # Under context parallelism wkv_b expands the whole row's gathered latents on every cp rank.
        gemm = q + 2 * T * D * (L + R) + 2 * T * s.cp * L * H * (N + Vd) + 2 * T * H * Vd * D
        core = T * S * s.cp * H * (N + R + Vd)  # QK^T and PV, half of the S x S (causal)
        moved = T * (2 * D + H * (2 * (N + R) + 2 * Vd) + Q + L) * b + T * (s.cp - 1) * (L + R) * b
    else:
        H, G, hd = m.n_heads // tp, m.n_kv_heads // tp, m.head_dim
        gemm = 2 * T * D * (H + 2 * G) * hd + 2 * T * H * hd * D
        core = 2 * T * S * s.cp * H * hd  # this rank's queries against the whole row's keys under cp
        moved = T * (2 * D + 3 * (H + G) * hd + 2 * H * hd) * b + T * (s.cp - 1) * 2 * G * hd * b
    return gemm, core, moved + 3 * s.norm_tokens * D * s.res * 2  # + the norm and the residual add


def kv_bytes(m: ModelConfig, s: Shape) -> int:
    """What one rank's attention contributes to the cp all-gather of one block: its positions' keys and values
    (MLA: normed latents and rotary keys)."""
    if getattr(m, "attention", "gqa") == "mla":
        return s.tokens * (m.kv_lora_rank + m.qk_rope_head_dim) * s.act
    return s.tokens * 2 * (m.n_kv_heads // s.tp) * m.head_dim * s.act


def ffn_work(
    m: ModelConfig, e: MoEConfig, s: Shape, is_moe: bool, fused_permute: bool = False
) -> tuple[float, float, float]:
    """Forward (linear-layer FLOPs, router FLOPs, bytes moved) of one block's feed-forward half on one rank,
    balanced routing. MoEyard's dispatcher moves each routed row about 6 times D (gather, weighted combine,
    scatter-add) and under EP 8 more (regrouped by expert and back, copied for each all-to-all); fused
    permutation kernels (Megatron's, DeepEP's) read and write it about 4 times in all."""
    D, b = m.dim, s.act
    norm = 3 * s.norm_tokens * D * s.res * 2
    if not is_moe:
        F = m.ffn_hidden // s.tp
        return 6 * s.tokens * D * F, 0.0, s.tokens * (2 * D + 5 * F) * b + norm
    T, E, Fe = s.moe_tokens, e.num_experts, e.expert_hidden
    sent, _ = routed_rows(e, replace(s, headroom=1.0))
    Fs = e.num_shared_experts * Fe
    linear = 6 * sent * D * Fe + 6 * T * D * Fs
    row = 4 * D if fused_permute else 6 * D + (8 * D if s.ep > 1 else 0)
    moved = T * (8 * E * FP32 + D * FP32) + sent * (row + 5 * Fe) * b + T * (2 * D + 5 * Fs) * b
    return linear, 2 * T * D * E, moved + norm


@dataclass(frozen=True)
class Work:
    """One chunk's (a pipeline stage's) per-micro-batch cost on a rank, in seconds."""

    compute: float
    tp: float
    ep: float
    fsdp_gather: float
    """One all-gather of the chunk's FSDP units (their parameters), in seconds."""
    fsdp_reduce: float
    """One reduce-scatter of their gradients."""


def chunk_work(
    m: ModelConfig,
    e: MoEConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    s: Shape,
    topo: Topology,
    layers: tuple[int, int],
    first: bool,
    last: bool,
    state: RankMemory,
) -> Work:
    """Forward + backward (+ recomputation) of one micro-batch through one stage on one rank."""
    rate = _rates(topo)
    tp_ranks, ep_ranks = list(range(dims.tp)), list(range(dims.ep))
    hidden = s.tokens * m.dim * s.act
    compute = tp_time = ep_time = 0.0
    all_gather = topo.ring(tp_ranks, hidden, "all_gather")
    # Sequence parallelism turns each all-reduce into a reduce-scatter and an all-gather: the same bytes on
    # NVLink, but gloo runs those two kinds several times slower per byte.
    reduce_scatter = topo.ring(tp_ranks, hidden, "reduce_scatter")
    all_reduce = all_gather + reduce_scatter if s.sp else topo.ring(tp_ranks, hidden, "all_reduce")
    a_gemm, a_core, a_bytes = attention_work(m, s)
    # Context parallelism: each attention all-gathers keys and values (MLA: latents and rotary keys) over the
    # cp ranks, and reduce-scatters their gradients in backward; counted with tp's collectives.
    cp_ranks = [i * dims.tp for i in range(dims.cp)]
    cp_pass = topo.ring(cp_ranks, s.cp * kv_bytes(m, s), "all_gather") if dims.cp > 1 else 0.0
    sent, _ = routed_rows(e, replace(s, headroom=1.0))
    a2a = topo.all_to_all(ep_ranks, sent * m.dim * s.act, _dedup_scale(e, topo, ep_ranks)) if dims.ep > 1 else 0.0
    per_kind = {}
    for is_moe in {m.is_moe_layer(layer) for layer in range(*layers)}:
        f_linear, f_router, f_bytes = ffn_work(m, e, s, is_moe, topo.features.fused_permute)
        matmul = (a_gemm + f_linear) / rate.linear + f_router / rate.gemm
        forward = matmul + a_core / rate.attention + (a_bytes + f_bytes) / rate.memory
        backward = 2 * matmul + 2.5 * a_core / rate.attention + 2 * (a_bytes + f_bytes) / rate.memory
        ffn_tp = all_reduce if not is_moe else (0.0 if s.sp else all_gather)
        per_kind[is_moe] = (forward, backward, all_reduce + ffn_tp + cp_pass, 2 * a2a if is_moe else 0.0)
    fixed = _fixed_per_block(pcfg, dims, topo.cal)
    for layer in range(*layers):
        is_moe = m.is_moe_layer(layer)
        forward, backward, tp_pass, ep_pass = per_kind[is_moe]
        passes = 3 if checkpointed(pcfg, layer) else 2  # forward, backward, and the recomputed forward
        ep_fixed = topo.cal.ep_layer_s if is_moe and dims.ep > 1 else 0.0
        # The fixed costs split about evenly between forward and backward; recomputation repeats the forward's.
        compute += (forward + (fixed + ep_fixed) / 2) * (passes - 2) + forward + backward + fixed + ep_fixed
        tp_time += passes * tp_pass
        ep_time += passes * ep_pass
    if last:
        V = m.vocab_size // s.tp
        head = 3 * 2 * s.tokens * m.dim * V / rate.gemm + 6 * s.tokens * V * FP32 / rate.memory
        mtp = topo.features.mtp_depth
        compute += head * (1 + mtp) + mtp * per_kind[m.is_moe_layer(layers[1] - 1)][:2][0] * 3
    if first:
        compute += 3 * hidden / rate.memory
    if dims.pp > 1:
        compute += topo.cal.pp_micro_s
        tp_time += 2 * topo.ring(tp_ranks, hidden, "all_reduce")  # the vocab-parallel embedding's output
    gather, reduce, fsdp_copies = _fsdp_comm(pcfg, dims, topo, state, layers)
    return Work(compute + fsdp_copies / rate.memory, tp_time, ep_time, gather, reduce)


def _fixed_per_block(pcfg: ParallelConfig, dims: ParallelDims, cal: Calibration) -> float:
    """Fixed seconds per block and micro-batch: the base and what tensor (and sequence) parallelism and FSDP
    add."""
    tp = (cal.tp_layer_s + (cal.sp_layer_s if pcfg.sequence_parallel else 0.0)) if dims.tp > 1 else 0.0
    fsdp = cal.fsdp_layer_s if pcfg.dp_mode == "fsdp" and dims.dp_cp > 1 else 0.0
    return cal.layer_s + tp + fsdp


def _dedup_scale(e: MoEConfig, topo: Topology, ep_ranks: list[int]) -> float:
    """With `Features.dedup_ib` (DeepEP): a token crosses InfiniBand once per node it goes to, not once per
    expert, and group-limited routing whose groups are the nodes caps those nodes at moe.topk_groups. The
    expected distinct other nodes of K picks, over the K x (n - 1) / n copies sent without deduplication."""
    nodes = len({r // topo.ranks_per_node for r in ep_ranks})
    if not topo.features.dedup_ib or nodes == 1:
        return 1.0
    K = e.top_k
    reach = e.topk_groups if e.n_groups == nodes else nodes
    distinct = reach * (1 - (1 - 1 / reach) ** K)
    return distinct * (1 - 1 / nodes) / (K * (1 - 1 / nodes))


def _fsdp_comm(
    pcfg: ParallelConfig, dims: ParallelDims, topo: Topology, state: RankMemory, layers
) -> tuple[float, float]:
    """FSDP's collectives of one chunk: (seconds of one all-gather of its parameters, of one reduce-scatter of
    its gradients; bytes its copies move in a micro-batch: each gather's output copied into the parameters,
    the gradients copied into the reduce-scatter's input, counted as if both ran every micro-batch). How
    many of each a step makes is `_fsdp_per_micro_batch`'s."""
    if pcfg.dp_mode != "fsdp" or dims.dp_cp == 1:
        return 0.0, 0.0, 0.0
    dp_ranks = [i * dims.tp for i in range(dims.dp_cp)]  # the mesh's dp axis: dp x cp ranks
    per = 2 if topo.bf16 else FP32
    blocks = state.gathered_block * (layers[1] - layers[0])
    gathered = blocks + state.gathered_root
    gather = topo.ring(dp_ranks, per * gathered, "all_gather")
    reduce = topo.ring(dp_ranks, FP32 * gathered, "reduce_scatter")
    return gather, reduce, gathered * (2 * 2 * per + 2 * FP32)


def _fsdp_per_micro_batch(works: list[Work], pcfg: ParallelConfig, dims: ParallelDims, micro: int) -> float:
    """A rank's FSDP collectives per step, in seconds per micro-batch. Gathers: one per unit and step under a
    pipeline with parallel.fsdp_hold=step (blocks stay gathered), else one in forward and one in backward per
    micro-batch. Reduce-scatters: one per step, unless fsdp_hold=micro_batch without a pipeline."""
    hold = pcfg.fsdp_hold == "step"
    gathers = 1 if dims.pp > 1 and hold else 2 * micro
    reduces = 1 if hold or dims.pp > 1 else micro
    return sum(gathers * w.fsdp_gather + reduces * w.fsdp_reduce for w in works) / micro


def step_time(
    m: ModelConfig,
    e: MoEConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    s: Shape,
    micro: int,
    topo: Topology,
    states: list[RankMemory],
    dense_expert_split: list[tuple[int, int]],
    cache: dict | None = None,
) -> StepTime:
    """The step of the slowest pipeline rank (module docstring). `states[r]` and `dense_expert_split[r]`
    (local dense and expert parameter elements) describe pipeline rank r's ranks."""
    cache = {} if cache is None else cache
    vpp = pcfg.pp_stages_per_rank if dims.pp > 1 else 1
    n_stages = dims.pp * vpp
    ranges = stage_layer_ranges(m.n_layers, n_stages, pcfg.pp_layers)
    per_rank: list[tuple[float, float, float, float, float]] = []
    for r in range(dims.pp):
        ids = local_stage_ids(r, dims.pp, vpp) if dims.pp > 1 else [0]
        works = []
        for i in ids:
            st, first, last = states[r], i == 0, i == n_stages - 1
            key = ("work", signature(m, pcfg, ranges[i]), first, last, st.gathered_root, st.gathered_block)
            if key not in cache:
                cache[key] = chunk_work(m, e, pcfg, dims, s, topo, ranges[i], first, last, st)
            works.append(cache[key])
        compute = sum(w.compute for w in works)
        # FSDP prefetches its collectives behind compute on a GPU; a CPU rank's one core does both.
        overlap = topo.device.name != "cpu"
        fsdp = _fsdp_per_micro_batch(works, pcfg, dims, micro)
        fsdp = max(0.0, fsdp - compute) if overlap else fsdp
        p2p = _p2p(m, s, dims, topo) * sum(2 * ((i > 0) + (i < n_stages - 1)) / 2 for i in ids)
        per_rank.append((compute, sum(w.tp for w in works), sum(w.ep for w in works), p2p, fsdp))
    if topo.features.dualpipe:  # rank r runs stage r of one direction and stage pp - 1 - r of the other
        pairs = zip(per_rank, per_rank[::-1], strict=True)
        per_rank = [tuple((a + b) / 2 for a, b in zip(x, y, strict=True)) for x, y in pairs]
    slot = max(sum(x) for x in per_rank)
    worst = max(range(dims.pp), key=lambda r: sum(per_rank[r]))
    compute, tp, ep, p2p, fsdp = per_rank[worst]
    f = topo.features
    if f.overlap_ep:
        ep = max(0.0, ep - 0.9 * compute)
        slot = slot - per_rank[worst][2] + ep
    if f.overlap_pp:
        slot -= p2p
        p2p = 0.0
    bubble_slots = _bubble_slots(pcfg.pp_schedule, dims.pp, vpp, f.dualpipe)
    dp = _dp_time(pcfg, dims, topo, states[worst], dense_expert_split[worst], compute / micro)
    return StepTime(
        compute=micro * compute,
        tp=micro * tp,
        ep=micro * ep,
        pp=micro * p2p,
        dp=dp + micro * fsdp,
        bubble=bubble_slots * slot,
        optimizer=_optimizer_time(states[worst], topo),
        overhead=topo.cal.step_s,
    )


def _bubble_slots(schedule: str, pp: int, vpp: int, dualpipe: bool) -> float:
    if pp == 1:
        return 0.0
    if dualpipe:
        return max(0.0, pp / 2 - 1)
    return (pp - 1) / vpp if schedule == "interleaved_1f1b" else pp - 1


def _p2p(m: ModelConfig, s: Shape, dims: ParallelDims, topo: Topology) -> float:
    """One send of a micro-batch's hidden state between neighbouring stages (forward or backward)."""
    if dims.pp == 1:
        return 0.0
    nbytes = s.rows * (s.seq // s.tp if s.sp else s.seq) * m.dim * s.res
    bw, lat = topo.link([0, dims.dp_cp * dims.tp], "send")
    return nbytes / (bw * topo.cal.coll_eff) + lat


def _dp_time(pcfg, dims, topo: Topology, state: RankMemory, split: tuple[int, int], backward: float) -> float:
    """Replicated gradients all-reduced once per step (FSDP's traffic is per micro-batch, in chunk_work), in
    buckets that are copied in, divided and copied back (6 passes over the bytes)."""
    if dims.dp_cp == 1 and dims.edp == 1 or (pcfg.dp_mode == "fsdp" and dims.dp_cp > 1):
        return 0.0
    dense, expert = split
    dp_ranks = [i * dims.tp for i in range(dims.dp_cp)]  # cp ranks reduce gradients with the dp ranks
    edp_ranks = [i * dims.ep for i in range(dims.edp)]
    t = topo.ring(dp_ranks, FP32 * dense, "all_reduce") + topo.ring(edp_ranks, FP32 * expert, "all_reduce")
    reduced = (dense if dims.dp_cp > 1 else 0) + (expert if dims.edp > 1 else 0)
    t += 6 * FP32 * reduced / _rates(topo).memory
    if topo.features.overlap_dp:
        return max(0.0, t - 2 / 3 * backward)
    return t


def _optimizer_time(state: RankMemory, topo: Topology) -> float:
    """AdamW reads parameter, gradient and both moments and writes three (fused: 28 B per element; the CPU's
    foreach kernels make more passes), and clipping reads the gradients."""
    per = 28 + 4 if topo.device.name != "cpu" else 64
    return per * state.params / (topo.device.hbm_gbps * 1e9 * topo.cal.mem_eff)


def one_device_step_s(
    m: ModelConfig,
    e: MoEConfig,
    batch: int,
    seq: int,
    device: DeviceSpec,
    cal: Calibration,
    bf16: bool,
    gemm_only: bool = False,
) -> float:
    """One process training `batch` sequences of `seq` tokens in one micro-batch (calibration's yardstick)."""
    b = 2 if bf16 else FP32
    shape = Shape(rows=batch, seq=seq, act=b, cast=b)
    rate = _rates(Topology(1, device, cal, bf16))
    total = 0.0
    for layer in range(m.n_layers):
        a_gemm, a_core, a_bytes = attention_work(m, shape)
        f_linear, f_router, f_bytes = ffn_work(m, e, shape, m.is_moe_layer(layer))
        total += 3 * (a_gemm + f_linear + f_router) / rate.gemm
        if not gemm_only:
            total += 3.5 * a_core / rate.attention + 3 * (a_bytes + f_bytes) / rate.memory + cal.layer_s
    total += 3 * 2 * batch * seq * m.dim * m.vocab_size / rate.gemm
    return total if gemm_only else total + cal.step_s
