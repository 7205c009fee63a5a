"""Stage 2 — the model's hyperparameters, typed, from GGUF metadata.

One dataclass for every architecture; fields an architecture lacks keep neutral defaults (no window, no QK-norm, ...),
so the schedule builder asks questions of the config rather than of the architecture name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import GGUFError, UnsupportedModelError
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
    try:   # a corrupt value of the wrong kind (a string, a list, 0 heads) fails here as a GGUFError, not a traceback
        cfg = _read_config(m, arch)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise GGUFError(f"{m.path}: corrupt {arch} metadata ({type(e).__name__}: {e})") from None
    check_config(m, cfg)
    return cfg


def _read_config(m: GGUFModel, arch: str) -> ModelConfig:
    a = lambda k, d=None: m.get(f"{arch}.{k}", d)  # noqa: E731
    req = lambda k: m.require(f"{arch}.{k}")  # noqa: E731
    n_embd, n_head = int(req("embedding_length")), int(req("attention.head_count"))
    if n_head <= 0:
        raise GGUFError(f"{m.path}: corrupt metadata: {arch}.attention.head_count = {n_head}")
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


def check_config(m: GGUFModel, c: ModelConfig):
    """Metadata that contradicts itself or the tensors' shapes means a corrupt file (a flipped byte in a count): fail
    here with the field's name instead of compiling a model that computes garbage or crashes later."""
    def bad(msg):
        return GGUFError(f"{m.path}: corrupt metadata: {msg}")
    for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_ff", "vocab", "context_length", "rope_dim"):
        if getattr(c, k) <= 0:
            raise bad(f"{k} = {getattr(c, k)}")
    if c.n_head % c.n_kv_head:
        raise bad(f"{c.n_head} heads are not a multiple of {c.n_kv_head} KV heads")
    if c.rope_dim > c.head_dim or c.rope_dim % 2:
        raise bad(f"rope dimension {c.rope_dim} does not fit head_dim {c.head_dim}")
    if not (math.isfinite(c.rms_eps) and 0 < c.rms_eps < 1) or not (math.isfinite(c.rope_base) and c.rope_base > 0):
        raise bad(f"rms epsilon {c.rms_eps} / rope base {c.rope_base} out of range")
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    expect = {"token_embd.weight": (c.vocab, c.n_embd), "blk.0.attn_norm.weight": (c.n_embd,),
              "blk.0.attn_q.weight": (q_dim, c.n_embd), "blk.0.attn_k.weight": (kv_dim, c.n_embd),
              "blk.0.attn_v.weight": (kv_dim, c.n_embd), "blk.0.attn_output.weight": (c.n_embd, q_dim),
              "blk.0.ffn_gate.weight": (c.n_ff, c.n_embd), "blk.0.ffn_down.weight": (c.n_embd, c.n_ff)}
    for name, shape in expect.items():   # numpy order (rows, K); a tensor the file lacks fails later, by name
        t = m.tensors.get(name)
        if t is not None and t.shape != shape:
            raise bad(f"tensor {name} has shape {list(t.shape)} but the metadata implies {list(shape)}")
    blocks = {n.split(".")[1] for n in m.tensors if n.startswith("blk.")}
    if blocks and len(blocks) != c.n_layer:
        raise bad(f"block_count = {c.n_layer} but the file has tensors for {len(blocks)} blocks")


def llama_config(m: GGUFModel, common: dict) -> ModelConfig:
    # llama GGUFs store Q/K permuted so that rotary pairs are adjacent (convert_hf_to_gguf.py's permute)
    return ModelConfig(**common, rope_style="norm")


# Gemma 3 constants the GGUF does not store; both llama.cpp (llama-model.cpp, LLM_ARCH_GEMMA3) and transformers
# (Gemma3TextConfig defaults) assume them, so a file without the optional keys below gets these.
GEMMA3_SWA_PERIOD = 6            # every 6th layer (5, 11, 17, ...) is global: llama.cpp's set_swa_pattern(6),
                                 # transformers' sliding_window_pattern = 6
GEMMA3_ROPE_BASE_LOCAL = 10000.0  # rope base of the sliding-window layers (rope_local_base_freq)


def swa_layer_pattern(m: GGUFModel, arch: str, n_layer: int, default_period: int) -> tuple[bool, ...]:
    """Per layer: True = sliding-window attention. `{arch}.attention.sliding_window_pattern` when the file has it
    (a bool per layer, or a period n: layer i is global iff i % n == n - 1), else `default_period` the same way.
    This is llama.cpp's rule: is_swa(il) = il % n < n - 1 (and n = 0 means every layer slides)."""
    pat = m.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pat, (list, tuple)):
        if len(pat) != n_layer:
            raise UnsupportedModelError(f"{arch}.attention.sliding_window_pattern has {len(pat)} entries for "
                                        f"{n_layer} layers")
        return tuple(bool(v) for v in pat)
    n = int(pat) if pat is not None else default_period
    return tuple(n == 0 or i % n < n - 1 for i in range(n_layer))


def gemma3_config(m: GGUFModel, common: dict) -> ModelConfig:
    """Gemma 3 (text). Differences from llama, each read from the file where it stores them:
    - attention: head_dim = attention.key_length (256, not n_embd / n_head); per-head RMSNorm of q and k before rope
      (attn_q_norm / attn_k_norm); softmax scale 1/sqrt(head_dim) (transformers: query_pre_attn_scalar ** -0.5 with
      query_pre_attn_scalar = head_dim by default; llama.cpp uses n_embd / n_head for the 27B only, whose
      query_pre_attn_scalar differs: mirrored below, overridable by attention.scale);
    - sliding-window attention (attention.sliding_window) on all layers but every 6th, whose rope base is
      rope.freq_base (1e6); the sliding layers use rope.freq_base_swa if present, else 10000 (not in the file);
    - rope "neox" (pairs i, i + d/2): convert_hf_to_gguf.py does not permute gemma's Q/K, transformers rotates halves
      (rotate_half) and llama.cpp runs LLAMA_ROPE_TYPE_NEOX for gemma3;
    - norms after attention and after the FFN (post_attention_norm, post_ffw_norm) added to the residual; the GGUF
      norm weights already hold gemma's (1 + w), so every norm is a plain x * rsqrt(mean x^2 + eps) * w;
    - embeddings scaled by sqrt(n_embd) (the tied LM head is not); FFN act gelu (tanh approximation) gated.
    Rope scaling (the 4B+ models' linear factor 8 on the global layers) and logit soft-capping are not implemented and
    are refused when the file asks for them (gemma3 itself sets no soft-capping)."""
    arch, n_layer = common["arch"], common["n_layer"]
    a = lambda k, d=None: m.get(f"{arch}.{k}", d)  # noqa: E731
    window = int(a("attention.sliding_window", 0) or 0)
    swa = swa_layer_pattern(m, arch, n_layer, GEMMA3_SWA_PERIOD) if window else ()
    factor = float(a("rope.scaling.factor", 1.0) or 1.0)
    if str(a("rope.scaling.type", "none")) not in ("none", "") and factor != 1.0:
        raise UnsupportedModelError(f"{arch}: rope scaling ({a('rope.scaling.type')}, factor {factor}) is not "
                                    f"supported yet")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if float(a(key, 0.0) or 0.0):
            raise UnsupportedModelError(f"{arch}: {key} = {a(key)} is not supported yet")
    scale = a("attention.scale")
    if scale is None and n_layer == 62:   # the 27B, as llama.cpp: query_pre_attn_scalar = n_embd / n_head
        scale = 1.0 / math.sqrt(common["n_embd"] / common["n_head"])
    return ModelConfig(
        **common,
        rope_style="neox",
        rope_base_local=float(a("rope.freq_base_swa", GEMMA3_ROPE_BASE_LOCAL)) if window else 0.0,
        sliding_window=window,
        swa_layers=swa,
        embed_scale=math.sqrt(common["n_embd"]),
        attn_scale=float(scale) if scale else 0.0,   # 0 -> 1/sqrt(head_dim)
        qk_norm="blk.0.attn_q_norm.weight" in m.tensors,
        post_norms="blk.0.post_attention_norm.weight" in m.tensors,
        act="gelu_tanh",
    )


# architecture -> config reader; the schedule builder for each lives in compiler/schedule.py
ARCH_CONFIG = {"llama": llama_config, "gemma3": gemma3_config}
