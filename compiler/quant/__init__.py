"""Quantization schemes: how each tensor type is laid out on the GPU (one registry, `QuantScheme.registry`).

    scheme.py     the declaration every scheme makes (GGUF block, packed regions) and what follows from it
    blocks32.py   F32, F16, BF16 and GGUF's 32-element blocks: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL
    kquants.py    GGUF's 256-element k-quants: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
    q4g.py        kiln's own re-quantization targets q4g32 / q4g64 / q4g128
    requant.py    `kiln compile --quant`: which tensors, which scheme
"""
from . import blocks32, kquants, q4g   # noqa: F401  (importing a module registers its schemes)
from .blocks32 import BF16, F16, F32, IQ4_NL, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from .kquants import QK_K, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
from .q4g import Q4G32, Q4G64, Q4G128
from .requant import REQUANT_SOURCES, kiln_schemes, requant_scheme, requant_targets, requantize
from .scheme import GROUP, QuantScheme, Region, scheme_for, scheme_named

GGUF_SCHEMES = {n: s for n, s in QuantScheme.registry.items() if s.ggml_type is not None}   # views of the one
KILN_SCHEMES = kiln_schemes()          # registry: GGUF tensor types / kiln's own schemes, by name
REQUANT_TARGETS = requant_targets()    # `kiln compile --quant` choices

__all__ = ["BF16", "F16", "IQ4_NL", "F32", "GGUF_SCHEMES", "GROUP", "KILN_SCHEMES", "Q2_K", "Q3_K", "Q4G128", "Q4G32", "Q4G64", "Q4_0", "Q4_1", "Q4_K",
           "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "QK_K", "QuantScheme", "REQUANT_SOURCES", "REQUANT_TARGETS", "Region",
           "requant_scheme", "requantize", "scheme_for", "scheme_named"]
