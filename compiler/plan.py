"""Stage 3 — plan weights: what every tensor becomes on the GPU, by formula, before anything is packed.

For every GGUF tensor (and the few constants the compiler computes, e.g. RoPE's inv_freq) the plan fixes the scheme it
is packed as, its (rows, K) shape and its row *parts*: consecutive row ranges whose packed bytes each fit in one shard
(<= shard_bytes, which is also below the 128 MiB storage-binding limit every WebGPU adapter grants). Sizes come from
`QuantScheme.packed_words` -- a formula of the scheme's declared regions -- so no data is read or packed here; the pack
stage (pack.py, called by shards.py) packs each part exactly once. A split tensor is invisible to kernels: the schedule
runs a kernel once per part with the part's row offset.

With `requant` (a scheme name, `kiln compile --quant`), every F32 / F16 / Q8_0 matrix (2-D; never norms or other 1-D
tensors) is planned in that scheme; pack.py re-quantizes it.

A layer's Q, K and V projections of one type and row length are also planned as one matrix, their rows stacked
(`blk.N.attn_qkv_concat.weight`; Q and K alone, `attn_qk_concat`, where V's type differs, as in Gemma 3's Q4_K_M):
the schedule runs one mat-vec for them instead of three (issue 14, fusion). Only what the programs bind is written.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf.quants import dequantize

from .config import ModelConfig
from .errors import GGUFError, UnsupportedModelError
from .gguf_file import GGUFModel
from .ir import SHARD_BYTES, WeightRef
from .quant import F32, REQUANT_SOURCES, QuantScheme, requant_scheme, scheme_for


def rope_inv_freq(base: float, dim: int) -> np.ndarray:
    """(dim/2,) f32 — as transformers computes it: 1 / base ** (arange(0, dim, 2) / dim), in float32."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exps)).astype(np.float32)


def model_inv_freq(m: GGUFModel, cfg: ModelConfig, base: float) -> np.ndarray:
    """(rope_dim/2,) f32 inv_freq with the file's rope scaling applied as transformers applies it: linear divides by
    the factor; llama 3's rope_freqs.weight (the converter's per-frequency factors, llama.cpp's freq_factors: 1 for
    high frequencies, `factor` for low ones, interpolated between) divides each frequency, in float32."""
    inv = rope_inv_freq(base, cfg.rope_dim)
    if cfg.rope_scale != 1.0:
        inv = (inv / np.float32(cfg.rope_scale)).astype(np.float32)
    if cfg.rope_freqs:
        t = m.tensor("rope_freqs.weight")
        factors = dequantize(np.asarray(t.data), t.ggml_type).reshape(-1).astype(np.float32)
        if not (np.isfinite(factors).all() and (factors > 0).all()):
            raise GGUFError(f"{m.path}: corrupt tensor rope_freqs.weight: a factor is not a positive finite number")
        inv = (inv / factors).astype(np.float32)
    return inv


# A weight the plan slices out of a GGUF tensor: (tensor, first row, rows) -- phi3's fused ffn_up = [gate | up]
def split_weights(cfg: ModelConfig) -> dict[str, tuple[str, int, int]]:
    out = {}
    if cfg.fused_gate_up:
        for L in range(cfg.n_layer):
            up = f"blk.{L}.ffn_up.weight"
            out[up + ":gate"] = (up, 0, cfg.n_ff)
            out[up + ":up"] = (up, cfg.n_ff, cfg.n_ff)
    return out


@dataclass(frozen=True)
class Source:
    """Where a planned weight's bytes come from: a GGUF tensor (its scheme) or a computed constant; `tensor` / `row0`:
    rows sliced out of another GGUF tensor (split_weights)."""
    scheme: type[QuantScheme]   # as stored in the GGUF (F32 for constants)
    constant: np.ndarray | None = None
    tensor: str | None = None     # the GGUF tensor to slice (None: the weight's own name)
    row0: int = 0
    concat: tuple[str, ...] = ()   # GGUF tensors whose rows, stacked in this order, are this weight (concat_qkv)


class WeightPlan:
    """{name: WeightRef} for every tensor of the model; `plan(name)` is what the schedule calls. A tensor whose type
    kiln cannot read is refused when (and only when) the schedule asks for it, with the type named."""

    def __init__(self, refs: dict[str, WeightRef], sources: dict[str, Source], refused: dict[str, Exception]):
        self.refs, self.sources, self.refused = refs, sources, refused

    def __call__(self, name: str) -> WeightRef:
        if name in self.refused:
            raise self.refused[name]
        return self.refs[name]

    def scheme(self, name: str) -> type[QuantScheme]:
        return QuantScheme.registry[self.refs[name].quant]


def _requantized(ggml_type, ndim: int, requant: type[QuantScheme] | None) -> bool:
    """Whether `--quant` re-quantizes a tensor of this type and rank (matrices of REQUANT_SOURCES types only)."""
    return requant is not None and ndim == 2 and ggml_type in REQUANT_SOURCES


def _target(ggml_type, ndim: int, requant: type[QuantScheme] | None) -> type[QuantScheme]:
    """The scheme a tensor of this type and rank is packed as. Vectors (norms, biases) are always f32: the kernels
    bind them as array<f32>, so an F16 / BF16 one is widened at pack time (converters write them F32 anyway)."""
    if ndim == 1 and ggml_type != F32.ggml_type:
        scheme_for(ggml_type)   # a type kiln cannot read is refused by name, as for matrices
        return F32
    return requant if _requantized(ggml_type, ndim, requant) else scheme_for(ggml_type)


def _parts(scheme: type[QuantScheme], rows: int, k: int, max_part_bytes: int) -> tuple[tuple[int, int], ...]:
    row_bytes = scheme.packed_words(1, k) * 4
    per_part = max(1, max_part_bytes // row_bytes)
    return tuple((r0, min(per_part, rows - r0)) for r0 in range(0, rows, per_part))


def plan_weights(m: GGUFModel, cfg: ModelConfig, shard_bytes: int = SHARD_BYTES,
                 requant: str | None = None) -> WeightPlan:
    target = requant_scheme(requant) if requant else None
    refs, sources, refused = {}, {}, {}
    constants = {"rope_inv_freq": model_inv_freq(m, cfg, cfg.rope_base)}
    if cfg.rope_base_local:
        constants["rope_inv_freq_local"] = model_inv_freq(m, cfg, cfg.rope_base_local)
    for name, a in constants.items():
        refs[name] = WeightRef(name, F32.name, 1, a.size, _parts(F32, 1, a.size, shard_bytes))
        sources[name] = Source(F32, a)
    for name, t in m.tensors.items():
        rows, k = (1, t.shape[0]) if len(t.shape) == 1 else (t.shape[0], t.shape[1])
        try:
            scheme = _target(t.ggml_type, len(t.shape), target)
            refs[name] = WeightRef(name, scheme.name, rows, k, _parts(scheme, rows, k, shard_bytes))
            sources[name] = Source(scheme_for(t.ggml_type))
        except UnsupportedModelError as e:
            refused[name] = e
    for name, (tensor, row0, rows) in split_weights(cfg).items():
        if tensor in refused:
            refused[name] = refused[tensor]
            continue
        scheme, k = QuantScheme.registry[refs[tensor].quant], refs[tensor].k
        refs[name] = WeightRef(name, scheme.name, rows, k, _parts(scheme, rows, k, shard_bytes))
        sources[name] = Source(sources[tensor].scheme, tensor=tensor, row0=row0)
    concat_qkv(m, cfg, refs, sources, shard_bytes)
    return WeightPlan(refs, sources, refused)


def concat_qkv(m: GGUFModel, cfg: ModelConfig, refs: dict, sources: dict, shard_bytes: int):
    """Adds blk.N.attn_qkv_concat.weight (Q, K, V rows stacked) where the three are planned alike and stored in one
    GGUF type, else blk.N.attn_qk_concat.weight for Q and K alone when those two are."""
    for L in range(cfg.n_layer):
        names = [f"blk.{L}.attn_{x}.weight" for x in "qkv"]
        if not all(n in refs for n in names):
            continue

        def alike(ns):
            a = refs[ns[0]]
            return all(refs[n].quant == a.quant and refs[n].k == a.k and sources[n] == sources[ns[0]]
                       and m.tensors[n].ggml_type == m.tensors[ns[0]].ggml_type for n in ns)
        for group, tag in ((names, "qkv"), (names[:2], "qk")):
            if alike(group):
                a, rows = refs[group[0]], sum(refs[n].rows for n in group)
                scheme = QuantScheme.registry[a.quant]
                name = f"blk.{L}.attn_{tag}_concat.weight"
                refs[name] = WeightRef(name, a.quant, rows, a.k, _parts(scheme, rows, a.k, shard_bytes))
                sources[name] = Source(sources[group[0]].scheme, concat=tuple(group))
                break


def tensor_types(m: GGUFModel, requant: str | None = None) -> dict[str, tuple[str, int]]:
    """{tensor: (type, bytes)} as the GPU will hold it (`kiln inspect --quant`): GGUF type names (Q8_0, ...) for
    tensors kept as they are, the scheme name in capitals (Q8_0, Q4G32, ...) for re-quantized ones."""
    scheme = requant_scheme(requant) if requant else None
    out = {}
    for name, t in m.tensors.items():
        if _requantized(t.ggml_type, len(t.shape), scheme):
            out[name] = (scheme.name.upper(), scheme.packed_words(t.shape[0], t.shape[1]) * 4)
        else:
            out[name] = (t.ggml_type.name, t.n_bytes)
    return out
