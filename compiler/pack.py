"""Pack weights (part of stage 6, called by shards.py): each planned part's bytes -> its GPU words, exactly once.

A part's rows are sliced from the GGUF tensor (memory-mapped: bounded memory, one part at a time), re-quantized when
the plan chose another scheme (`kiln compile --quant`: gguf.quants.dequantize, then compiler/quant/requant.py), and
repacked by its scheme's declared regions (compiler/quant/scheme.py, QuantScheme.pack).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from gguf.quants import dequantize

from .gguf_file import GGUFModel
from .plan import WeightPlan
from .quant import requantize


def packed_parts(m: GGUFModel, plan: WeightPlan, name: str) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (part index, packed u32 words) for one planned weight, one part at a time."""
    ref, src, scheme = plan(name), plan.sources[name], plan.scheme(name)
    if src.constant is not None:
        raw, row_bytes = src.constant.view(np.uint8), src.constant.nbytes // ref.rows
    elif src.concat:   # rows of several GGUF tensors stacked (plan.py concat_qkv): row-major, so bytes concatenate
        raw = np.concatenate([np.asarray(m.tensor(n).data).reshape(-1).view(np.uint8) for n in src.concat])
        row_bytes = raw.size // ref.rows
    else:   # rows of the weight's own tensor, or (src.tensor) of the tensor it is sliced from, from src.row0 on
        t = m.tensor(src.tensor or name)
        raw = t.data
        row_bytes = raw.size // (t.shape[0] if len(t.shape) == 2 else 1)
    for i, (row0, n) in enumerate(ref.parts):
        row0 += src.row0
        part = raw[row0 * row_bytes:(row0 + n) * row_bytes]
        if scheme is not src.scheme:   # re-quantize this part's rows
            floats = dequantize(np.asarray(part).reshape(n, row_bytes), src.scheme.ggml_type).reshape(n, ref.k)
            part = requantize(scheme, floats)
        words = scheme.pack(part, n, ref.k)
        assert words.size == scheme.packed_words(n, ref.k), (name, i)   # the plan's formula is the packed size
        yield i, words
