"""Model quality: negative log-likelihood and perplexity of a token sequence, on the GPU through the `score` program.

    nll_sum, n = nll(session, ids)      sum over i of -log p(ids[i+1] | ids[:i+1]), and n = len(ids) - 1 predictions
    perplexity(session, ids)            exp(nll_sum / n)

The log-softmax is taken in float64 on the host, one score chunk at a time (Gemma's 262144-token vocabulary would make
the whole (n, vocab) logits matrix hundreds of MiB). tests/quality.py compares kiln's number with llama.cpp's on the
same ids and across `kiln compile --quant` schemes.
"""
from __future__ import annotations

import math

import numpy as np


def nll_from_logits(logits: np.ndarray, targets: np.ndarray) -> float:
    """sum_i -log softmax(logits[i])[targets[i]], float64."""
    z = np.asarray(logits, np.float64)
    mx = z.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(z - mx).sum(axis=1))
    return float(np.sum(lse - z[np.arange(len(targets)), targets]))


def nll(session, ids: list[int]) -> tuple[float, int]:
    """(sum of -log p(next token), number of predictions) for `ids` from an empty cache."""
    ids = [int(i) for i in ids]
    session.reset()
    total, c0 = 0.0, 0
    for logits in session.score_chunks(ids):
        T = len(logits)
        targets = np.asarray(ids[c0 + 1:c0 + T + 1])
        total += nll_from_logits(logits[:len(targets)], targets)
        c0 += T
    return total, len(ids) - 1


def perplexity(session, ids: list[int]) -> float:
    s, n = nll(session, ids)
    return math.exp(s / n)
