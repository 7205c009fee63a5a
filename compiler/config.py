"""Stage 2 — the model's hyperparameters, typed, from GGUF metadata.

One dataclass for every architecture; fields an architecture lacks keep neutral defaults (no window, no QK-norm, ...),
so the schedule builder asks questions of the config rather than of the architecture name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import UnsupportedModelError
from .gguf_file import GGUFModel



@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layer: int
    n_embd: int            # D
    n_head: int
    n_kv_head: int
    head_dim: int
    n_ff: int
    vocab: int
    context_length: int    # trained context
    rms_eps: float
    rope_base: float
    rope_dim: int          # rotated dims per head
    rope_style: str        # "norm" (pairs 2i, 2i+1) | "neox" (pairs i, i + rope_dim/2)
    rope_base_local: float = 0.0          # sliding-window layers' rope base (gemma3)
    sliding_window: int = 0               # 0 = none
    swa_layers: tuple[bool, ...] = ()     # per layer: uses the sliding window
    embed_scale: float = 1.0
    attn_scale: float = 0.0               # 0 -> 1/sqrt(head_dim)
    qk_norm: bool = False
    post_norms: bool = False              # gemma: norms after attention and after the FFN
    act: str = "silu"                     # "silu" | "gelu_tanh"
    tied_output: bool = True
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["swa_layers"] = list(self.swa_layers)
        return d

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def kv_cache_bytes(self, ctx: int, bytes_per=4) -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x ctx x bytes."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * ctx * bytes_per


def read_config(m: GGUFModel) -> ModelConfig:
    arch = m.arch
    if arch not in ARCH_CONFIG:
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported (supported: {', '.join(sorted(ARCH_CONFIG))})")
    a = lambda k, d=None: m.get(f"{arch}.{k}", d)  # noqa: E731
    req = lambda k: m.require(f"{arch}.{k}")  # noqa: E731
    n_embd, n_head = int(req("embedding_length")), int(req("attention.head_count"))
    head_dim = int(a("attention.key_length", n_embd // n_head))
    vocab = int(a("vocab_size", 0) or len(m.require("tokenizer.ggml.tokens")))
    common = dict(
        arch=arch, name=str(m.get("general.name", m.path.stem)),
        n_layer=int(req("block_count")), n_embd=n_embd, n_head=n_head,
        n_kv_head=int(a("attention.head_count_kv", n_head)), head_dim=head_dim,
        n_ff=int(req("feed_forward_length")), vocab=vocab,
        context_length=int(a("context_length", 2048)),
        rms_eps=float(req("attention.layer_norm_rms_epsilon")),
        rope_base=float(a("rope.freq_base", 10000.0)),
        rope_dim=int(a("rope.dimension_count", head_dim)),
        tied_output="output.weight" not in m.tensors,
    )
    return ARCH_CONFIG[arch](m, common)


def llama_config(m: GGUFModel, common: dict) -> ModelConfig:
    # llama GGUFs store Q/K permuted so that rotary pairs are adjacent (convert_hf_to_gguf.py's permute)
    return ModelConfig(**common, rope_style="norm")


# architecture -> config reader; the schedule builder for each lives in compiler/schedule.py
ARCH_CONFIG = {"llama": llama_config}
