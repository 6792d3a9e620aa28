"""Model and MoE configuration dataclasses (also the Hydra structured-config schema for `model` and `moe`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def choice(default: str, *others: str) -> Any:
    """A string field limited to `default` and `others` (OmegaConf has no Literal; `launch.validate` checks)."""
    return field(default=default, metadata={"choices": (default, *others)})


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
    """Key/value heads (grouped-query attention); must divide n_heads."""
    ffn_hidden: int = 128
    """Hidden width of the dense SwiGLU FFN."""
    max_seq_len: int = 128
    """Longest sequence the RoPE tables cover."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output projection."""
    first_dense_layers: int = 0
    """The first N blocks use a dense FFN instead of MoE (DeepSeek style)."""
    moe_every: int = 1
    """After the dense prefix, every k-th block is MoE, the others dense (1 = all MoE)."""
    attn_impl: str = choice("sdpa", "flash")
    """Attention kernel: torch SDPA everywhere, or flash-attn when installed and on CUDA (falls back to SDPA)."""
    init_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

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
    aux_loss_coef: float = 0.01
    """Switch/GShard load-balancing loss coefficient (batch level)."""
    seq_aux_loss_coef: float = 0.0
    """Sequence-level balancing loss coefficient (DeepSeek-V3)."""
    z_loss_coef: float = 0.001
    """Router z-loss coefficient (ST-MoE)."""
    bias_update_rate: float = 0.0
    """Aux-loss-free balancing: per-step update of the selection bias (DeepSeek-V3); 0 = off."""
    grouped_mm: str = choice("auto", "on", "off")
    """Expert matmuls as one torch grouped_mm (auto: when torch has it) or a per-expert loop."""
