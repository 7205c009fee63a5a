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


ROPE_SCALING_KEYS = frozenset(["rope.scaling.type", "rope.scaling.factor", "rope.scale_linear"])


def rope_scaling(m: GGUFModel, arch: str) -> float:
    """The linear rope-scaling factor (1 = none), as llama.cpp reads it (llama-model.cpp): rope.scaling.factor, else
    the old rope.scale_linear, 0 meaning 1; the type defaults to linear. transformers' "linear" divides inv_freq by the
    factor, llama.cpp multiplies the position by 1/factor: the same angle. Other types (yarn, longrope, ...) are
    refused by name."""
    kind = m.get(f"{arch}.rope.scaling.type", "linear")
    key = f"{arch}.rope.scaling.factor"
    key = key if key in m.reader.fields else f"{arch}.rope.scale_linear"
    factor = m.get(key, 0.0)
    if not _is_num(factor, factor) or not math.isfinite(factor):   # a bool is not a factor (True == 1 in Python)
        raise UnsupportedModelError(f"{m.path}: {key} = {_show(factor)} is not implemented in kiln's {arch} model "
                                    f"(a rope scaling factor is a number)")
    factor = float(factor) or 1.0
    if kind in ("none", "") and factor == 1.0 or kind == "linear":
        return factor
    raise UnsupportedModelError(f"{m.path}: {arch}.rope.scaling.type = {_show(kind)} (factor {_show(factor)}) is not "
                                f"implemented in kiln's {arch} model (implemented: linear, and llama 3's rope_freqs)")


def llama_config(m: GGUFModel, common: dict) -> ModelConfig:
    """Llama 1-3 and Mistral (which llama.cpp writes as arch llama). llama GGUFs store Q/K permuted so that rotary pairs
    are adjacent (convert_hf_to_gguf.py's permute): rope "norm". Rope scaling: linear (rope.scaling.*), and Llama
    3.1+'s "llama3" type, which the converter bakes into rope_freqs.weight (per-frequency divisors of inv_freq; what
    llama.cpp's ggml_rope_ext takes as freq_factors)."""
    return ModelConfig(**common, rope_style="norm", rope_scale=rope_scaling(m, common["arch"]),
                       rope_freqs="rope_freqs.weight" in m.tensors)


def qwen_config(m: GGUFModel, common: dict) -> ModelConfig:
    """Qwen 2 / 2.5 (arch qwen2: Q/K/V biases) and Qwen 3 (arch qwen3: per-head RMSNorm of q and k before rope, no
    biases). Rope "neox": the converter does not permute qwen's Q/K (llama.cpp: LLAMA_ROPE_TYPE_NEOX). Linear rope
    scaling as llama; YaRN (Qwen2.5 long-context files) is refused by name."""
    return ModelConfig(**common, rope_style="neox", rope_scale=rope_scaling(m, common["arch"]),
                       qkv_bias="blk.0.attn_q.bias" in m.tensors, qk_norm="blk.0.attn_q_norm.weight" in m.tensors)


def phi3_config(m: GGUFModel, common: dict) -> ModelConfig:
    """Phi-3 4k (arch phi3: Phi-3-mini-4k, Phi-3-medium-4k). Differences from llama:
    - fused attn_qkv.weight ([q | k | v] rows: written straight into the qkv buffer, whose layout is the same) and
      ffn_up.weight = [gate | up] (2 n_ff rows, no ffn_gate: sliced at compile time into two weights, plan.py);
    - rope "neox" (llama.cpp: LLAMA_ROPE_TYPE_NEOX) over rope.dimension_count dims;
    - attention.sliding_window (2047 in Phi-3-mini-4k) on every layer, as transformers does (llama.cpp ignores it;
      the two agree below 2048 tokens).
    The 128k models' LongRoPE (Phi-3.5, Phi-4-mini: rope_factors_long / rope_factors_short tensors,
    rope.scaling.attn_factor) is refused by name."""
    arch = common["arch"]
    window = meta_int(m, f"{arch}.attention.sliding_window", 0)
    return ModelConfig(**common, rope_style="neox", rope_scale=rope_scaling(m, arch), fused_qkv=True,
                       fused_gate_up=True, sliding_window=window,
                       swa_layers=(True,) * common["n_layer"] if window else ())


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
    n = meta_int(m, f"{arch}.attention.sliding_window_pattern") if pat is not None else default_period
    if not 0 <= n <= 1024:
        raise GGUFError(f"{m.path}: corrupt metadata: {arch}.attention.sliding_window_pattern = {n}")
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
    f = lambda k, d: meta_float(m, f"{arch}.{k}", d)  # noqa: E731
    window = meta_int(m, f"{arch}.attention.sliding_window", 0)
    swa = swa_layer_pattern(m, arch, n_layer, GEMMA3_SWA_PERIOD) if window else ()
    factor = f("rope.scaling.factor", 1.0)
    if str(a("rope.scaling.type", "none")) not in ("none", "") and factor != 1.0:
        raise UnsupportedModelError(f"{m.path}: {arch}.rope.scaling.type = {_show(a('rope.scaling.type'))} (factor "
                                    f"{_show(factor)}) is not implemented in kiln's {arch} model")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if f(key, 0.0):
            raise UnsupportedModelError(f"{m.path}: {arch}.{key} = {_show(f(key, 0.0))} is not implemented in kiln's "
                                        f"{arch} model")
    scale = f("attention.scale", 0.0) or None
    if scale is None and n_layer == 62:   # the 27B, as llama.cpp: query_pre_attn_scalar = n_embd / n_head
        scale = 1.0 / math.sqrt(common["n_embd"] / common["n_head"])
    return ModelConfig(
        **common,
        rope_style="neox",
        rope_base_local=f("rope.freq_base_swa", GEMMA3_ROPE_BASE_LOCAL) if window else 0.0,
        sliding_window=window,
        swa_layers=swa,
        embed_scale=math.sqrt(common["n_embd"]),
        attn_scale=float(scale) if scale else 0.0,   # 0 -> 1/sqrt(head_dim)
        qk_norm="blk.0.attn_q_norm.weight" in m.tensors,
        post_norms="blk.0.post_attention_norm.weight" in m.tensors,
        act="gelu_tanh",
    )


GEMMA2_SWA_PERIOD = 2   # layers 0, 2, 4, ... slide, the odd ones are global: llama.cpp set_swa_pattern(2),
                        # transformers' layer_types


def gemma2_config(m: GGUFModel, common: dict) -> ModelConfig:
    """Gemma 2. As gemma3 (norms after attention and the FFN, embeddings x sqrt(n_embd), gelu-tanh, rope neox, the
    GGUF's norm weights already 1 + w), except: attention logits soft-capped (scores = cap * tanh(scores / cap)
    after the scale, before the mask: attn_logit_softcapping) and so are the final logits
    (final_logit_softcapping); sliding window (attention.sliding_window) on the even layers, one rope base for all;
    no QK-norm. Softmax scale 1/sqrt(head_dim) (query_pre_attn_scalar = head_dim), except the 27B (46 layers:
    n_embd / n_head), as llama.cpp."""
    arch, n_layer = common["arch"], common["n_layer"]
    f = lambda k, d: meta_float(m, f"{arch}.{k}", d)  # noqa: E731
    window = meta_int(m, f"{arch}.attention.sliding_window", 0)
    scale = f("attention.scale", 0.0) or None
    if scale is None and n_layer == 46:
        scale = 1.0 / math.sqrt(common["n_embd"] / common["n_head"])
    return ModelConfig(
        **common, rope_style="neox", rope_scale=rope_scaling(m, arch),
        sliding_window=window, swa_layers=swa_layer_pattern(m, arch, n_layer, GEMMA2_SWA_PERIOD) if window else (),
        embed_scale=math.sqrt(common["n_embd"]), attn_scale=float(scale) if scale else 0.0,
        post_norms=True, act="gelu_tanh",
        attn_softcap=f("attn_logit_softcapping", 0.0), final_softcap=f("final_logit_softcapping", 0.0))


# architecture -> config reader; the schedule builder for each lives in compiler/schedule.py
ARCH_CONFIG = {"llama": llama_config, "gemma3": gemma3_config, "qwen2": qwen_config, "qwen3": qwen_config,
               "phi3": phi3_config, "gemma2": gemma2_config}


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
