"""Attention backends: each equal to the plain XLA formulation, and the backend selection logic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sega_jax.models import attention as A
from tests.helpers import beyond_one_rounding, max_rel_diff

FP32_TOL = 1e-5


def _qkv(seed, b, lq, lk, h, d, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(kq, (b, lq, h, d), jnp.float32).astype(dtype),
            jax.random.normal(kk, (b, lk, h, d), jnp.float32).astype(dtype),
            jax.random.normal(kv, (b, lk, h, d), jnp.float32).astype(dtype))


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    A.set_attention_implementation(None)
    yield
    A.set_attention_implementation(None)


_xla = jax.jit(A.xla_attention)
_chunked = jax.jit(A.chunked_attention, static_argnames=("q_chunk", "k_chunk"))
_batched = jax.jit(A.batched_attention)


# (b, lq, lk, heads, head_dim, q_chunk, k_chunk): defaults, odd lengths with query padding, online softmax
# over key chunks with key padding (1000 = 4 chunks of 256, the last one padded), 77-key cross-attention,
# SD's 4096-token self-attention and the VAE's single 512-dim head.
SHAPES = [
    (2, 77, 77, 4, 64, None, None),
    (2, 1000, 77, 3, 40, 300, None),  # 4 query chunks of 256: the last one padded with 24 rows
    (1, 1000, 1000, 2, 40, 200, 256),
    (1, 1024, 1024, 2, 80, None, None),
    (1, 4096, 4096, 1, 40, None, None),
    (1, 4096, 4096, 1, 40, 1024, 1024),
    (1, 1000, 1000, 1, 512, 336, 400),
]


@pytest.mark.parametrize("b, lq, lk, h, d, qc, kc", SHAPES)
def test_chunked_equals_plain_fp32(b, lq, lk, h, d, qc, kc):
    q, k, v = _qkv(lq + lk + d, b, lq, lk, h, d)
    ref = _xla(q, k, v)
    out = _chunked(q, k, v, q_chunk=qc, k_chunk=kc)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert max_rel_diff(out, ref) < FP32_TOL


# Short key sequences, the batched backend's domain: CLIP, cross-attention onto 77 tokens at the tiny model's
# and SD's shapes (odd query counts included), SD's lowest-level self-attention.
BATCHED_SHAPES = [(2, 77, 77, 12, 64), (6, 1024, 77, 4, 8), (2, 1000, 77, 3, 40), (2, 4096, 77, 8, 40),
                  (2, 256, 256, 8, 160), (1, 33, 5, 2, 16)]


@pytest.mark.parametrize("b, lq, lk, h, d", BATCHED_SHAPES)
def test_batched_equals_plain_fp32(b, lq, lk, h, d):
    q, k, v = _qkv(lq + lk + d, b, lq, lk, h, d)
    ref = _xla(q, k, v)
    out = _batched(q, k, v)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert max_rel_diff(out, ref) < FP32_TOL


def _masks(b, h, lq, lk):
    rng = np.random.default_rng(0)
    random = rng.random((b, h, lq, lk)) < rng.random((b, h, 1, 1))  # per batch and head, varying density
    random[0, 1, 3] = False  # a fully masked query row: the plain path averages v over all keys
    padding = np.ones((b, 1, 1, lk), bool)  # key padding, broadcast over heads and queries
    padding[-1, ..., lk // 3:] = False
    return {"causal": np.tril(np.ones((lq, lk), bool)), "random": random, "padding": padding}


@pytest.mark.parametrize("kind", ["causal", "random", "padding"])
@pytest.mark.parametrize("qc, kc", [(None, None), (96, 300)])
def test_chunked_mask_equals_plain(kind, qc, kc):
    b, lq, lk, h, d = 2, 300, 700, 3, 32
    q, k, v = _qkv(7, b, lq, lk, h, d)
    mask = jnp.asarray(_masks(b, h, lq, lk)[kind])
    ref = _xla(q, k, v, mask=mask)
    out = _chunked(q, k, v, mask=mask, q_chunk=qc, k_chunk=kc)
    assert max_rel_diff(out, ref) < FP32_TOL


@pytest.mark.parametrize("kind", ["causal", "random", "padding"])
def test_batched_mask_equals_plain(kind):
    b, lq, lk, h, d = 2, 300, 77, 3, 32
    q, k, v = _qkv(8, b, lq, lk, h, d)
    mask = jnp.asarray(_masks(b, h, lq, lk)[kind])
    assert max_rel_diff(_batched(q, k, v, mask=mask), _xla(q, k, v, mask=mask)) < FP32_TOL


def test_clip_causal_mask_through_dispatcher():
    q, k, v = _qkv(3, 2, 77, 77, 12, 64)
    mask = jnp.tril(jnp.ones((77, 77), bool))[None, None]
    ref = _xla(q, k, v, mask=mask)
    for impl in ("chunked", "batched", "cudnn", None):
        f = jax.jit(lambda q, k, v, m, i=impl: A.dot_product_attention(q, k, v, mask=m, implementation=i))
        assert max_rel_diff(f(q, k, v, mask), ref) < FP32_TOL, impl


@pytest.mark.parametrize("dtype, b, lq, lk, h, d, qc, kc", [
    (jnp.bfloat16, 1, 1000, 1000, 2, 40, 256, 300),
    (jnp.bfloat16, 1, 512, 512, 1, 512, None, None),
    (jnp.bfloat16, 2, 1000, 77, 3, 40, None, None),
    (jnp.float16, 1, 1000, 1000, 2, 40, 256, None),
])
def test_half_precision_within_bound(dtype, b, lq, lk, h, d, qc, kc):
    q, k, v = _qkv(11, b, lq, lk, h, d, dtype)
    exact = _xla(*(t.astype(jnp.float32) for t in (q, k, v)))  # same rounded inputs, fp32 arithmetic
    plain = _xla(q, k, v)
    out = _chunked(q, k, v, q_chunk=qc, k_chunk=kc)
    assert out.dtype == dtype
    err, plain_err = max_rel_diff(out, exact), max_rel_diff(plain, exact)
    # Output rounding (2**-8 relative for bf16) plus, in the plain path (and chunked off CPU), probabilities
    # cast to half for PV (measured before CPU's fp32 PV: chunked 2.8e-3..3.9e-3 vs plain 3.1e-3..4.7e-3 for
    # bf16, 4.3e-4 vs 5.4e-4 for fp16).
    assert err < 1e-2 and err <= 1.5 * plain_err, (err, plain_err)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_batched_half_precision_within_bound(dtype):
    q, k, v = _qkv(12, 2, 1000, 77, 3, 40, dtype)
    exact = _xla(*(t.astype(jnp.float32) for t in (q, k, v)))
    out, plain = _batched(q, k, v), _xla(q, k, v)
    assert out.dtype == dtype
    err, plain_err = max_rel_diff(out, exact), max_rel_diff(plain, exact)
    assert err < 1e-2 and err <= 1.5 * plain_err, (err, plain_err)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fp32 PV product of XLA:CPU")
@pytest.mark.parametrize("backend, lk", [(_chunked, 1000), (_batched, 77)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cpu_half_precision_attention_rounds_only_its_output(backend, lk, dtype):
    q, k, v = _qkv(13, 2, 1000, lk, 2, 40, dtype)
    exact = _xla(*(t.astype(jnp.float32) for t in (q, k, v)))
    got = backend(q, k, v).astype(jnp.float32)
    # At most one rounding of the exact result (unit roundoff u) plus fp32 noise; probabilities rounded for
    # the PV product too, as the plain path does, measured 1.1e-4 (fp16) .. 1.2e-3 (bf16) beyond it.
    assert beyond_one_rounding(got, exact, dtype) <= 1e-5


def test_dispatcher_under_jit_picks_chunked_for_long_sequences():
    q, k, v = _qkv(5, 1, 1024, 1024, 2, 40)
    assert A.select_implementation(q.shape, k.shape, q.dtype, platform="cpu") == "chunked"
    ref = _xla(q, k, v)
    out = jax.jit(A.dot_product_attention)(q, k, v)
    assert max_rel_diff(out, ref) < FP32_TOL
    forced = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, implementation="chunked"))(q, k, v)
    assert max_rel_diff(forced, ref) < FP32_TOL


# ---------------------------------------------------------------------------------------------- selection

SD_SELF = ((2, 4096, 8, 40), (2, 4096, 8, 40))
SD_CROSS = ((2, 4096, 8, 40), (2, 77, 8, 40))
SD_MID = ((2, 1024, 8, 80), (2, 1024, 8, 80))
SD_LOW = ((2, 256, 8, 160), (2, 256, 8, 160))
CLIP = ((1, 77, 12, 64), (1, 77, 12, 64))
VAE = ((1, 4096, 1, 512), (1, 4096, 1, 512))


def _sel(shapes, dtype=jnp.float32, **kw):
    return A.select_implementation(*shapes, dtype, **kw)


def test_auto_selection_on_cpu_and_tpu():
    for platform in ("cpu", "tpu"):
        short = "batched" if platform == "cpu" else "xla"
        assert _sel(SD_SELF, platform=platform) == "chunked"
        assert _sel(SD_MID, platform=platform) == "chunked"
        assert _sel(VAE, platform=platform) == "chunked"
        assert _sel(SD_CROSS, platform=platform) == short
        assert _sel(SD_LOW, platform=platform) == short
        assert _sel(CLIP, platform=platform, has_mask=True) == short
        assert _sel(SD_SELF, jnp.bfloat16, platform=platform) == "chunked"


def test_auto_selection_on_cuda():
    bf16, fp16 = jnp.bfloat16, jnp.float16
    assert _sel(SD_SELF, bf16, platform="cuda", max_head_dim=128) == "cudnn"
    assert _sel(SD_CROSS, fp16, platform="cuda", max_head_dim=128) == "cudnn"
    assert _sel(SD_SELF, jnp.float32, platform="cuda", max_head_dim=128) == "xla"  # cuDNN flash: half only
    assert _sel(SD_SELF, bf16, platform="cuda", has_mask=True, max_head_dim=128) == "xla"
    assert _sel(VAE, bf16, platform="cuda", max_head_dim=256) == "xla"  # head dim 512
    assert _sel(SD_LOW, bf16, platform="cuda", max_head_dim=128) == "xla"  # 160 > 128 before Hopper
    assert _sel(SD_LOW, bf16, platform="cuda", max_head_dim=256) == "cudnn"  # Hopper and later
    odd = ((1, 64, 2, 36), (1, 64, 2, 36))
    assert _sel(odd, bf16, platform="cuda", max_head_dim=256) == "xla"  # not a multiple of 8
    assert _sel(SD_SELF, bf16, platform="rocm", max_head_dim=256) == "xla"


def test_forced_cudnn_never_on_cpu_and_falls_back():
    for platform in ("cpu", "tpu", "rocm"):
        assert _sel(SD_SELF, jnp.bfloat16, platform=platform, implementation="cudnn") == "xla"
    assert _sel(SD_SELF, jnp.bfloat16, platform="cuda", implementation="cudnn", max_head_dim=128) == "cudnn"
    assert _sel(VAE, jnp.bfloat16, platform="cuda", implementation="cudnn", max_head_dim=256) == "xla"


def test_forcing_precedence(monkeypatch):
    assert _sel(SD_SELF, platform="cpu") == "chunked"
    monkeypatch.setenv(A.ENV_VAR, "xla")
    assert A.get_attention_implementation() == "xla"
    assert _sel(SD_SELF, platform="cpu") == "xla"
    A.set_attention_implementation("chunked")  # the module setting beats the environment
    assert _sel(CLIP, platform="cpu") == "chunked"
    assert _sel(CLIP, platform="cpu", implementation="xla") == "xla"  # the argument beats both
    assert _sel(CLIP, platform="cpu", implementation="auto") == "chunked"  # "auto" defers to the setting
    A.set_attention_implementation(None)
    monkeypatch.setenv(A.ENV_VAR, "auto")
    assert _sel(SD_SELF, platform="cpu") == "chunked"
    with A.attention_implementation("xla"):
        assert _sel(SD_SELF, platform="cpu") == "xla"
    assert _sel(SD_SELF, platform="cpu") == "chunked"


def test_invalid_names_raise(monkeypatch):
    with pytest.raises(ValueError):
        A.set_attention_implementation("flash")
    with pytest.raises(ValueError):
        _sel(CLIP, platform="cpu", implementation="pallas")
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(ValueError):
        _sel(CLIP, platform="cpu")


def test_cpu_dispatch_never_calls_cudnn(monkeypatch):
    assert A._platform() == "cpu"

    def boom(*a, **k):
        raise AssertionError("cuDNN must not be tried on CPU")

    monkeypatch.setattr(A, "cudnn_attention", boom)
    q, k, v = _qkv(1, 1, 64, 64, 2, 40, jnp.bfloat16)
    out = A.dot_product_attention(q, k, v, implementation="cudnn")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(_xla(q, k, v), np.float32))
    A.set_attention_implementation("cudnn")
    A.dot_product_attention(q, k, v)


def test_mocked_cuda_dispatch_and_fallback(monkeypatch):
    calls = []

    def fake_cudnn(q, k, v):
        calls.append(q.shape)
        return A.xla_attention(q, k, v)

    monkeypatch.setattr(A, "_platform", lambda: "cuda")
    monkeypatch.setattr(A, "_cudnn_max_head_dim", lambda: 128)
    monkeypatch.setattr(A, "cudnn_attention", fake_cudnn)
    q, k, v = _qkv(2, 1, 64, 64, 2, 40, jnp.bfloat16)
    A.dot_product_attention(q, k, v)
    assert calls == [q.shape]
    A.dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    A.dot_product_attention(q, k, v, mask=jnp.ones((64, 64), bool))
    assert len(calls) == 1  # fp32 and masked calls went to xla

    def rejecting_cudnn(q, k, v):
        raise NotImplementedError("unsupported by this cuDNN")

    monkeypatch.setattr(A, "cudnn_attention", rejecting_cudnn)
    out = A.dot_product_attention(q, k, v)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(_xla(q, k, v), np.float32))
