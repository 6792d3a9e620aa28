"""Model and MoE configuration dataclasses (also the Hydra structured-config schema for `model` and `moe`)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any


def choice(default: str, *others: str) -> Any:
    """A string field limited to `default` and `others` (OmegaConf has no Literal; `check_fields` checks)."""
    return field(default=default, metadata={"choices": (default, *others)})


def require(ok: bool, field: str, value: object, rule: str) -> None:
    """Raises ValueError "field=value rule" unless `ok`: the one-line error of every config group's `check()`.

    ValueError, not the job's ConfigError, because the groups sit below the job schema; `launch` shows it as a
    config error."""
    if not ok:
        raise ValueError(f"{field}={value} {rule}")


def check_fields(node: object, prefix: str) -> None:
    """Every key of the dataclass `node` is a schema field, and every `choice(...)` field holds a listed value."""
    # Hydra's `+key=value` appends keys the structured schema lacks; OmegaConf then sets them as attributes.
    known = [f.name for f in dataclasses.fields(node)]
    for name in (n for n in vars(node) if n not in known):  # the hint's fuzzy match only for a stray key
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        rule = f"is not a field of {type(node).__name__} (rule: keys must be schema fields{hint})"
        require(name in known, f"{prefix}{name}", getattr(node, name), rule)
    for f in dataclasses.fields(node):
        if "choices" in f.metadata:
            value = getattr(node, f.name)
            require(
                value in f.metadata["choices"],
                f"{prefix}{f.name}",
                value,
                f"must be one of {', '.join(f.metadata['choices'])}",
            )


@dataclass(kw_only=True)
class ModelConfig:
    """Shape of the decoder-only transformer."""

    name: str = "debug"
    """Preset name, for logs and run directories."""
    vocab_size: int = 256
    """Vocabulary size; 256 for the byte-level tokenizer."""
    dim: int = 64
    """Model (residual stream) width D."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention query heads."""
    n_kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide n_heads. Unused by mla (one per query head)."""
    ffn_hidden: int = 128
    """Hidden width of the dense SwiGLU FFN."""
    max_seq_len: int = 128
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    partial_rotary_factor: float = 1.0
    """gqa: the share of each q/k head's channels that RoPE rotates, the first ones (GLM-4.5: 0.5); the
    others carry no position."""
    rope_scaling: str = choice("none", "yarn")
    """RoPE context extension: none, or YaRN (Peng et al., 2023) with the yarn_* fields below, as DeepSeek-V3
    and Qwen3's long-context configs use it (`moe.attention.rope_table`)."""
    yarn_factor: float = 1.0
    """yarn: how many times the pre-training context is extended (s; DeepSeek-V3: 40)."""
    yarn_original_max_seq_len: int = 4096
    """yarn: the pre-training context whose short wavelengths are kept as they were."""
    yarn_beta_fast: float = 32.0
    """yarn: pairs turning more than this many times within the original context keep their frequency."""
    yarn_beta_slow: float = 1.0
    """yarn: pairs turning fewer times than this are interpolated by the factor (a linear ramp between; equal
    betas, as Kimi-K2's 1 and 1, ramp over one pair)."""
    yarn_truncate: bool = True
    """yarn: round the ramp's ends outward to whole pairs (transformers' default); gpt-oss does not."""
    yarn_mscale: float = 1.0
    """yarn: with both yarn_mscale and yarn_mscale_all_dim > 0, cos/sin are scaled by m(s, mscale) /
    m(s, mscale_all_dim), where m(s, a) = 0.1 a ln s + 1; otherwise by m(s, 1) (the paper's temperature)."""
    yarn_mscale_all_dim: float = 0.0
    """yarn, mla: DeepSeek's softmax scale 1/sqrt(q/k head dim) times m(s, mscale_all_dim)^2 (0: unscaled)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    first_dense_layers: int = 0
    """The first N blocks use a dense FFN instead of MoE (DeepSeek style)."""
    moe_every: int = 1
    """After the dense prefix, every k-th block is MoE, the others dense (1 = all MoE)."""
    attn_impl: str = choice("auto", "sdpa", "flash", "flex")
    """Attention kernel (`moe.attention.attention_kernel`): auto = on CUDA FlexAttention for packed documents
    and for GQA that flash cannot take, SDPA's fused kernels otherwise, SDPA off CUDA; sdpa = SDPA only (on
    CUDA a call only its math kernel takes raises); flash = flash-attn where installed and it fits, else auto;
    flex = FlexAttention always (compiled on CUDA)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    attention_sinks: bool = False
    """gqa: one learned logit per query head joins every softmax's denominator, so a head may attend to
    nothing (gpt-oss; Xiao et al., 2023); `moe.attention.attend`."""
    o_bias: bool = False
    """gqa: a bias on the output projection (gpt-oss's attention_bias covers q/k/v and o)."""
    sliding_window: int = 0
    """Blocks that slide attend only to the last `sliding_window` positions (their own included); 0 = none."""
    sliding_layers: str = choice("even", "all")
    """With sliding_window: which blocks slide, the even ones (0, 2, ...: gpt-oss) or all."""
    attention: str = choice("gqa", "mla")
    """Grouped-query attention (Llama, Mixtral, Qwen, OLMoE) or multi-head latent attention (DeepSeek-V2/V3)."""
    head_dim_override: int | None = None
    """gqa: width of each q/k/v head; null = dim / n_heads (Qwen3-30B-A3B: 128 at dim 2048 with 32 heads)."""
    qk_norm: str = choice("none", "head", "full")
    """gqa: RMSNorm of q and k before RoPE: none, per head over head_dim (Qwen3), or over all heads (OLMoE)."""
    qkv_bias: bool = False
    """gqa: biases on the q, k and v projections (Qwen2, Qwen2-MoE); the output projection has none."""
    q_lora_rank: int = 0
    """mla: rank of the query down-projection; 0 = one plain query projection (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 512
    """mla: width of the compressed key/value latent."""
    qk_rope_head_dim: int = 64
    """mla: channels per q/k head that carry RoPE (the key's are one head shared by all query heads)."""
    qk_nope_head_dim: int = 128
    """mla: channels per q/k head without RoPE."""
    v_head_dim: int = 128
    """mla: width of each value head."""
    mtp_layers: int = 0
    """Multi-token prediction modules D (DeepSeek-V3: 1; moe/mtp.py): module k predicts the token k + 1 places
    past the next, with its own norms, projection, block and head norm, sharing the embedding and output."""

    @property
    def head_dim(self) -> int:
        """Width of each query/key head (mla: qk_nope_head_dim + qk_rope_head_dim)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Channels per head that RoPE rotates (the width of the rotary table)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)  # rounded down, as transformers does

    def check(self) -> None:
        """Raises ValueError naming the first model field whose value breaks a rule."""
        check_fields(self, "model.")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
            require(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "must be >= 1")
        require(
            self.dim % self.n_heads == 0 or self.head_dim_override is not None or self.attention == "mla",
            "model.dim",
            self.dim,
            f"must be divisible by model.n_heads={self.n_heads} (or set model.head_dim_override)",
        )
        self.check_attention()
        require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        require(self.first_dense_layers >= 0, "model.first_dense_layers", self.first_dense_layers, "must be >= 0")
        require(self.moe_every >= 1, "model.moe_every", self.moe_every, "must be >= 1")
        require(self.mtp_layers >= 0, "model.mtp_layers", self.mtp_layers, "must be >= 0 (0 = no MTP modules)")
        for name in ("rope_theta", "norm_eps"):
            require(getattr(self, name) > 0, f"model.{name}", getattr(self, name), "must be > 0")
        require(self.init_std >= 0, "model.init_std", self.init_std, "must be >= 0")
        require(self.sliding_window >= 0, "model.sliding_window", self.sliding_window, "must be >= 0 (0 = none)")
        dense = "must not be flex with model.attention_sinks or model.sliding_window (they attend through SDPA)"
        require(self.attn_impl != "flex" or not (self.attention_sinks or self.sliding_window),
                "model.attn_impl", self.attn_impl, dense)  # fmt: skip

    def check_attention(self) -> None:
        """Raises ValueError naming the first attention or RoPE field whose value breaks a rule."""
        pairs = "must be even and >= 2 (RoPE rotates channel pairs)"
        if self.attention == "gqa":
            name = "head_dim_override" if self.head_dim_override is not None else "dim/n_heads"
            rotary = f"must be in (0, 1] and rotate an even number >= 2 of head_dim={self.head_dim} channels"
            rules = [
                (self.head_dim >= 2 and self.head_dim % 2 == 0, name, pairs),
                (0 < self.partial_rotary_factor <= 1 and self.rope_dim >= 2 and self.rope_dim % 2 == 0,
                 "partial_rotary_factor", rotary),
            ]  # fmt: skip
        else:
            why = "with model.attention=mla (MLA normalises its latents and has no q/k/v biases)"
            rope = self.qk_rope_head_dim
            rules = [
                (self.head_dim_override is None, "head_dim_override", f"must be null {why}"),
                (
                    self.partial_rotary_factor == 1,
                    "partial_rotary_factor",
                    "must be 1 with model.attention=mla (its rotary width is qk_rope_head_dim)",
                ),
                (self.qk_norm == "none", "qk_norm", f"must be none {why}"),
                (not self.qkv_bias, "qkv_bias", f"must be false {why}"),
                (not self.o_bias, "o_bias", f"must be false {why}"),
                (not self.attention_sinks, "attention_sinks", "must be false with model.attention=mla (gqa only)"),
                (self.sliding_window == 0, "sliding_window", "must be 0 with model.attention=mla (gqa only)"),
                (self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 = a plain query projection)"),
                (self.kv_lora_rank >= 1, "kv_lora_rank", "must be >= 1"),
                (self.qk_nope_head_dim >= 1, "qk_nope_head_dim", "must be >= 1"),
                (self.v_head_dim >= 1, "v_head_dim", "must be >= 1"),
                (rope >= 2 and rope % 2 == 0, "qk_rope_head_dim", pairs),
            ]
        if self.rope_scaling == "yarn":
            rules += [
                (self.yarn_factor >= 1, "yarn_factor", "must be >= 1 (the context extension factor)"),
                (self.yarn_original_max_seq_len >= 1, "yarn_original_max_seq_len", "must be >= 1"),
                (self.yarn_beta_fast >= self.yarn_beta_slow > 0, "yarn_beta_fast", "must be >= yarn_beta_slow > 0"),
                (self.yarn_mscale_all_dim >= 0, "yarn_mscale_all_dim", "must be >= 0 (0: no softmax scaling)"),
            ]
        for ok, name, rule in rules:
            if not ok:
                value = self.head_dim if name == "dim/n_heads" else getattr(self, name)
                raise ValueError(f"model.{name}={value} {rule}")

    def window(self, layer_id: int) -> int:
        """How many positions block `layer_id` attends back over (its own included); 0 = the whole sequence."""
        slides = self.sliding_layers == "all" or layer_id % 2 == 0
        return self.sliding_window if slides else 0

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether block `layer_id` gets an MoE FFN under the placement knobs."""
        if layer_id < self.first_dense_layers:
            return False
        return (layer_id - self.first_dense_layers) % self.moe_every == 0


@dataclass(kw_only=True)
class MoEConfig:
    """Routing, capacity, balancing and expert shapes of every MoE layer."""

    num_experts: int = 8
    """Routed experts E per MoE layer."""
    top_k: int = 2
    """Experts per token K (token-choice); the capacity multiplier for expert-choice."""
    expert_hidden: int = 64
    """Hidden width F of each routed expert; fine-grained experts use a small F and a large E."""
    num_shared_experts: int = 0
    """Always-on shared experts (DeepSeek style), fused into one SwiGLU of width num_shared * expert_hidden."""
    shared_expert_hidden: int | None = None
    """Width of that fused shared SwiGLU; null = num_shared_experts * expert_hidden (Qwen2-MoE sets its own)."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output per token by sigmoid(x . w), w one learned [D] row (Qwen2-MoE)."""
    router: str = choice("softmax_topk", "sigmoid_topk", "expert_choice")
    """Token-choice softmax (Switch/GShard/Mixtral), token-choice sigmoid (DeepSeek-V3), or expert-choice."""
    norm_topk_prob: bool = True
    """Renormalise the K selected weights to sum to one."""
    route_scale: float = 1.0
    """Multiplier on the combine weights."""
    n_groups: int = 1
    """Expert groups for group-limited routing (1 = off)."""
    topk_groups: int = 1
    """Groups a token may route into when n_groups > 1."""
    capacity_factor: float | None = None
    """Tokens per expert = ceil(capacity_factor * S * K / E) per sequence of S tokens; null = dropless."""
    drop_policy: str = choice("probability", "position")
    """Which assignments are dropped past capacity: lowest router weight first, or latest position first."""
    dispatch: str = choice("dynamic", "static")
    """How an MoE layer sizes its buffers: dynamic reads its row counts on the host once per layer (exact
    sizes); static sizes them from the config and the batch shape and reads nothing on the host, so the layer
    compiles with fullgraph=True and can be captured in a CUDA graph (moe/static_dispatch.py)."""
    dispatch_capacity_factor: float | None = None
    """dispatch=static: slots per expert per sequence of S tokens = ceil(factor * S * K / E); assignments past
    them are dropped, lowest router weight first, and counted in dropped_frac. null = S slots, which nothing
    overflows (buffers E / K times the mean load)."""
    aux_loss_coef: float = 0.01
    """Switch/GShard load-balancing loss coefficient (over the tokens `balance_scope` says)."""
    balance_scope: str = choice("micro_batch", "sequence", "global_batch")
    """Which tokens aux_loss_coef's statistics f_e and P_e cover: the micro-batch on every dp x tp rank; each
    sequence (DeepSeek-V3's sequence-wise loss); or the step (f_e of micro-batch m over micro-batches 0..m of
    the step, as Megatron-Core's global_aux_loss; moe/balance.py)."""
    seq_aux_loss_coef: float = 0.0
    """Sequence-level balancing loss coefficient (DeepSeek-V3)."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient (ST-MoE)."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: per-step update of the selection bias (DeepSeek-V3); 0 = off."""
    grouped_mm: str = choice("auto", "on", "off")
    """Expert matmuls as one torch grouped_mm (auto: when torch has it) or a per-expert loop."""
    router_bias: bool = False
    """A learned bias on the router logits, which selection and weights both see (gpt-oss)."""
    expert_biases: bool = False
    """Biases on each routed expert's three projections (gpt-oss; `moe.experts.GroupedExperts`)."""
    activation: str = choice("swiglu", "clamped_swiglu")
    """Routed experts' gate: silu(g) * u, or gpt-oss's (clamp(u, +-limit) + 1) * g' sigmoid(alpha g') with
    g' = min(g, limit)."""
    swiglu_alpha: float = 1.702
    """clamped_swiglu: the sigmoid's gain (gpt-oss: 1.702, GELU's sigmoid approximation)."""
    swiglu_limit: float = 7.0
    """clamped_swiglu: the clamp on gate (above) and up (both sides) (gpt-oss: 7.0)."""

    @property
    def shared_hidden(self) -> int:
        """Width of the fused shared-expert SwiGLU (0: no shared experts)."""
        if self.num_shared_experts == 0:
            return 0
        return self.shared_expert_hidden or self.num_shared_experts * self.expert_hidden

    def check(self) -> None:
        """Raises ValueError naming the first MoE field whose value breaks a rule."""
        check_fields(self, "moe.")
        require(self.num_experts >= 1, "moe.num_experts", self.num_experts, "must be >= 1")
        experts = f"moe.num_experts={self.num_experts}"
        require(1 <= self.top_k <= self.num_experts, "moe.top_k", self.top_k, f"must be in [1, {experts}]")
        require(self.expert_hidden >= 1, "moe.expert_hidden", self.expert_hidden, "must be >= 1")
        require(self.num_shared_experts >= 0, "moe.num_shared_experts", self.num_shared_experts, "must be >= 0")
        self.check_shared()
        cf = self.capacity_factor
        require(cf is None or cf > 0, "moe.capacity_factor", cf, "must be > 0, or null for dropless")
        self.check_dispatch()
        groups_ok = self.n_groups >= 1 and self.num_experts % self.n_groups == 0
        require(groups_ok, "moe.n_groups", self.n_groups, f"must divide {experts}")
        in_groups = f"must be in [1, moe.n_groups={self.n_groups}]"
        require(1 <= self.topk_groups <= self.n_groups, "moe.topk_groups", self.topk_groups, in_groups)
        if self.n_groups > 1:
            reachable = self.topk_groups * (self.num_experts // self.n_groups)
            rule = f"must be <= experts in the chosen groups ({reachable})"
            require(self.top_k <= reachable, "moe.top_k", self.top_k, rule)
        require(self.route_scale > 0, "moe.route_scale", self.route_scale, "must be > 0")
        require(self.swiglu_limit > 0, "moe.swiglu_limit", self.swiglu_limit, "must be > 0")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            require(getattr(self, name) >= 0, f"moe.{name}", getattr(self, name), "must be >= 0")

    def check_dispatch(self) -> None:
        """Raises ValueError naming the first dispatch field whose value breaks a rule."""
        dcf = self.dispatch_capacity_factor
        require(dcf is None or dcf > 0, "moe.dispatch_capacity_factor", dcf, "must be > 0, or null for no overflow")
        rule = "needs moe.dispatch=static (the dynamic dispatch sizes its buffers exactly and drops nothing)"
        require(dcf is None or self.dispatch == "static", "moe.dispatch_capacity_factor", dcf, rule)
        rule = "is token-choice only (expert_choice's slices hold data-dependent counts per expert); use dynamic"
        require(self.dispatch == "dynamic" or self.router != "expert_choice", "moe.dispatch", self.dispatch, rule)

    def check_shared(self) -> None:
        """Raises ValueError naming the first shared-expert field whose value breaks a rule."""
        width = self.shared_expert_hidden
        if width is not None and width < 1:
            raise ValueError(f"moe.shared_expert_hidden={width} must be >= 1 (or null: num_shared * expert_hidden)")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError(
                "moe.shared_expert_gate=True needs moe.num_shared_experts >= 1 (it gates the shared experts)"
            )
