"""Stage 2 — the model's hyperparameters, typed, from GGUF metadata.

One dataclass for every architecture; fields an architecture lacks keep neutral defaults (no window, no QK-norm, ...),
so the schedule builder asks questions of the config rather than of the architecture name.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import GGUFError, UnsupportedModelError
from .gguf_file import GGUFModel, escape, quote



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
    rope_freqs: bool = False              # llama 3.1+: rope_freqs.weight (rope_dim/2,) divides inv_freq
    rope_scale: float = 1.0               # linear rope scaling: inv_freq / factor (positions / factor)
    qkv_bias: bool = False                # qwen2: attn_{q,k,v}.bias added after the projections
    fused_qkv: bool = False               # phi3: one attn_qkv.weight (q_dim + 2 kv_dim, D) = [q | k | v] rows
    fused_gate_up: bool = False           # phi3: ffn_up.weight (2 n_ff, D) = [gate | up] rows, no ffn_gate
    attn_softcap: float = 0.0             # gemma2: scores = cap * tanh(scores / cap) (0 = none)
    final_softcap: float = 0.0            # gemma2: logits = cap * tanh(logits / cap) (0 = none)
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


# Sane ranges for every hyperparameter, wide enough for every released model (405B: 126 layers, 16384 wide, 128 heads;
# 10M-token contexts; 262k-token vocabularies) and tight enough that a flipped byte or a hostile value (rope base
# 1e-45, 2^32 layers) is refused by name instead of compiling a model that computes garbage or allocates terabytes.
INT_RANGES = {"n_layer": (1, 1024), "n_embd": (1, 1 << 16), "n_head": (1, 1024), "n_kv_head": (1, 1024),
              "head_dim": (1, 1024), "n_ff": (1, 1 << 20), "vocab": (1, 1 << 22), "context_length": (1, 1 << 24),
              "rope_dim": (2, 1024), "sliding_window": (0, 1 << 24)}
FLOAT_RANGES = {"rms_eps": (1e-12, 0.1), "rope_base": (1.0, 1e12), "rope_base_local": (1.0, 1e12),   # (lo, hi]
                "embed_scale": (1e-6, 1e6), "attn_scale": (1e-6, 1e3), "rope_scale": (1e-3, 1e6),
                "attn_softcap": (1e-3, 1e6), "final_softcap": (1e-3, 1e6)}
# 0 = no local rope base / the default 1/sqrt(head_dim) / no soft-capping
_ZERO_MEANS_NONE = ("rope_base_local", "attn_scale", "attn_softcap", "final_softcap")
# keys the config reads -> the field they set, for messages
_KEYS = {"n_layer": "block_count", "n_embd": "embedding_length", "n_head": "attention.head_count",
         "n_kv_head": "attention.head_count_kv", "head_dim": "attention.key_length", "n_ff": "feed_forward_length",
         "vocab": "vocab_size", "context_length": "context_length", "rope_dim": "rope.dimension_count",
         "sliding_window": "attention.sliding_window", "rms_eps": "attention.layer_norm_rms_epsilon",
         "rope_base": "rope.freq_base", "rope_base_local": "rope.freq_base_swa", "attn_scale": "attention.scale",
         "rope_scale": "rope.scaling.factor", "attn_softcap": "attn_logit_softcapping",
         "final_softcap": "final_logit_softcapping"}


def read_config(m: GGUFModel, refuse_unsupported: bool = True) -> ModelConfig:
    """refuse_unsupported=False: return the config of a file that holds keys or tensors kiln does not implement
    (`kiln inspect` lists them with `unsupported`); compiling always refuses them."""
    from .config_archs import ARCH_CONFIG   # the readers import this module's helpers: imported here, not at the top
    arch = m.arch
    if arch not in ARCH_CONFIG:
        raise UnsupportedModelError(
            f"architecture {quote(arch)} is not supported (supported: {', '.join(sorted(ARCH_CONFIG))})")
    try:   # a corrupt value of the wrong kind (a string, a list, 0 heads) fails here as a GGUFError, not a traceback
        cfg = _read_config(m, arch)
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
        raise GGUFError(f"{m.path}: corrupt {arch} metadata ({type(e).__name__}: {escape(e)})") from None
    check_config(m, cfg)
    from .refuse import unsupported   # refuse.py reads this module's tables: imported here, not at the top
    items = unsupported(m, cfg) if refuse_unsupported else []
    if items:   # one line, short: the first item, then as many others as fit in ~200 characters, then a count
        also = []
        for it in items[1:]:
            if sum(len(a) + 2 for a in also) + len(it) > 200:
                break
            also.append(it)
        rest = len(items) - 1 - len(also)
        more = (f"; also {', '.join(also)}" if also else "") + \
            (f"{' and' if also else '; and'} {rest} more" if rest else "")
        raise UnsupportedModelError(f"{m.path}: {items[0]} is not implemented in kiln's {arch} model (ignoring it "
                                    f"would compute a different model){more}")
    return cfg


def meta_int(m: GGUFModel, key: str, default=None) -> int:
    """An integer metadata value (an int-typed GGUF field: not a float, bool, string or array)."""
    v = m.get(key) if default is None else m.get(key, default)
    if v is None:
        v = m.require(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise GGUFError(f"{m.path}: corrupt metadata: {key} = {quote(v)} is not an integer")
    return v


def meta_float(m: GGUFModel, key: str, default=None) -> float:
    """A number metadata value (float or int GGUF field), finite."""
    v = m.get(key) if default is None else m.get(key, default)
    if v is None:
        v = m.require(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise GGUFError(f"{m.path}: corrupt metadata: {key} = {quote(v)} is not a finite number")
    return float(v)


def _read_config(m: GGUFModel, arch: str) -> ModelConfig:
    i = lambda k, d=None: meta_int(m, f"{arch}.{k}", d)  # noqa: E731
    f = lambda k, d=None: meta_float(m, f"{arch}.{k}", d)  # noqa: E731
    n_embd, n_head = i("embedding_length"), i("attention.head_count")
    if n_head <= 0:
        raise GGUFError(f"{m.path}: corrupt metadata: {arch}.attention.head_count = {n_head}")
    head_dim = i("attention.key_length", n_embd // n_head)
    if i("attention.value_length", head_dim) != head_dim:   # equal: the one value the shared kernels need
        raise UnsupportedModelError(f"{m.path}: {arch}.attention.value_length = {i('attention.value_length')} "
                                    f"(differing from the key length {head_dim}) is not implemented: kiln's "
                                    f"attention assumes they are equal")
    tokens = m.require("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise GGUFError(f"{m.path}: corrupt metadata: tokenizer.ggml.tokens is not an array of strings")
    vocab = i("vocab_size", len(tokens))
    if vocab != len(tokens):
        raise GGUFError(f"{m.path}: corrupt metadata: {arch}.vocab_size = {vocab} but tokenizer.ggml.tokens has "
                        f"{len(tokens)} entries")
    common = dict(
        arch=arch, name=escape(m.get("general.name", m.path.stem), 200),
        n_layer=i("block_count"), n_embd=n_embd, n_head=n_head,
        n_kv_head=i("attention.head_count_kv", n_head), head_dim=head_dim,
        n_ff=i("feed_forward_length"), vocab=vocab,
        context_length=i("context_length", 2048),
        rms_eps=f("attention.layer_norm_rms_epsilon"),
        rope_base=f("rope.freq_base", 10000.0),
        rope_dim=i("rope.dimension_count", head_dim),
        tied_output="output.weight" not in m.tensors,
    )
    for k, (lo, hi) in INT_RANGES.items():   # before the architecture's reader sizes anything by them (per layer)
        if k in common and not lo <= common[k] <= hi:
            raise GGUFError(f"{m.path}: corrupt metadata: {k} = {common[k]} ({arch}.{_KEYS[k]}) is outside {lo}..{hi}")
    from .config_archs import ARCH_CONFIG
    return ARCH_CONFIG[arch](m, common)


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the schedule reads for this config, with its shape in numpy order (rows, K) / (n,)."""
    q_dim, kv_dim = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    D = c.n_embd
    out = {"token_embd.weight": (c.vocab, D), "output_norm.weight": (D,)}
    if not c.tied_output:
        out["output.weight"] = (c.vocab, D)
    if c.rope_freqs:
        out["rope_freqs.weight"] = (c.rope_dim // 2,)
    for L in range(c.n_layer):
        b = f"blk.{L}."
        out[b + "attn_norm.weight"] = (D,)
        if c.fused_qkv:
            out[b + "attn_qkv.weight"] = (q_dim + 2 * kv_dim, D)
        else:
            out.update({b + "attn_q.weight": (q_dim, D), b + "attn_k.weight": (kv_dim, D),
                        b + "attn_v.weight": (kv_dim, D)})
        if c.qkv_bias:
            out.update({b + "attn_q.bias": (q_dim,), b + "attn_k.bias": (kv_dim,), b + "attn_v.bias": (kv_dim,)})
        out.update({b + "attn_output.weight": (D, q_dim), b + "ffn_norm.weight": (D,)})
        if c.fused_gate_up:
            out[b + "ffn_up.weight"] = (2 * c.n_ff, D)
        else:
            out.update({b + "ffn_gate.weight": (c.n_ff, D), b + "ffn_up.weight": (c.n_ff, D)})
        out[b + "ffn_down.weight"] = (D, c.n_ff)
        if c.qk_norm:
            out.update({b + "attn_q_norm.weight": (c.head_dim,), b + "attn_k_norm.weight": (c.head_dim,)})
        if c.post_norms:
            out.update({b + "post_attention_norm.weight": (D,), b + "post_ffw_norm.weight": (D,)})
    return out


def check_config(m: GGUFModel, c: ModelConfig):
    """Metadata that is out of range, contradicts itself or the tensors' shapes means a corrupt file (a flipped byte in
    a count): fail here with the field's name instead of compiling a model that computes garbage or crashes later.
    Every tensor of every layer is checked; a tensor kiln would not read (a bias, llama 3.1's rope_freqs) is refused
    by name by `unsupported`, since ignoring it would run a different model than the file describes."""
    def bad(msg):
        return GGUFError(f"{m.path}: corrupt metadata: {msg}")

    def key(k):
        return f"{c.arch}.{_KEYS[k]}" if k in _KEYS else k
    for k, (lo, hi) in INT_RANGES.items():
        v = getattr(c, k)
        if not lo <= v <= hi:
            raise bad(f"{k} = {v} ({key(k)}) is outside {lo}..{hi}")
    for k, (lo, hi) in FLOAT_RANGES.items():
        v = getattr(c, k)
        if not math.isfinite(v) or not (lo < v <= hi or (v == 0.0 and k in _ZERO_MEANS_NONE)):
            raise bad(f"{k} = {v:g} ({key(k)}) is outside ({lo:g}, {hi:g}]")
    if c.n_head % c.n_kv_head:
        raise bad(f"{c.n_head} heads are not a multiple of {c.n_kv_head} KV heads")
    if c.rope_dim > c.head_dim or c.rope_dim % 2:
        raise bad(f"rope dimension {c.rope_dim} does not fit head_dim {c.head_dim}")
    if c.swa_layers and len(c.swa_layers) != c.n_layer:
        raise bad(f"{len(c.swa_layers)} sliding-window flags for {c.n_layer} layers")
    blocks = {n.split(".")[1] for n in m.tensors if n.startswith("blk.")}
    if blocks and len(blocks) != c.n_layer:
        raise bad(f"block_count = {c.n_layer} but the file has tensors for {len(blocks)} blocks")
    expect = expected_shapes(c)
    for name, shape in expect.items():   # numpy order (rows, K), in layer order
        t = m.tensors.get(name)
        if t is not None and t.shape != shape:
            raise bad(f"tensor {quote(name)} has shape {list(t.shape)} but the metadata implies {list(shape)}")
    for name in m.tensors:
        if name not in expect:
            if name.startswith("blk.") and not (name.split(".")[1].isdigit() and int(name.split(".")[1]) < c.n_layer):
                raise bad(f"block_count = {c.n_layer} but the file has tensor {quote(name)}")
            continue   # not read by kiln: refused by name in `unsupported`
    missing = [n for n in expect if n not in m.tensors]
    if missing:
        raise GGUFError(f"{m.path}: tensor {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def _is_num(v, *values) -> bool:
    """v is a number (not a bool: True == 1 in Python) equal to one of `values`."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v in values


def _show(v) -> str:
    """A metadata value for a message: strings quoted and escaped, true/false, numbers as they are, arrays by size."""
    if isinstance(v, (list, tuple)):
        return f"[{len(v)} values]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):   # float32 in the file: 7 significant digits (1e-06, not 9.999999974752427e-07)
        g = f"{v:.7g}"
        return g if any(c in g for c in ".en") else g + ".0"
    return escape(v) if isinstance(v, int) else quote(v)
