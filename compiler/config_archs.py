"""Stage 2, per architecture — one reader per GGUF architecture (`ARCH_CONFIG`): the metadata only that architecture
has (sliding windows, soft-capping, QK-norm, rope scaling) onto the shared `ModelConfig` (compiler/config.py reads
the keys every architecture has and checks the result). Adding an architecture starts here."""
from __future__ import annotations

import math

from .config import ModelConfig, _is_num, _show, meta_float, meta_int
from .errors import GGUFError, UnsupportedModelError
from .gguf_file import GGUFModel

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
