"""The one attention function every model calls, so a faster kernel is a change in one place.

`dot_product_attention(q, k, v, mask=None)` works on (batch, length, heads, head_dim) arrays and picks one of
four backends when it is traced (the choice is static, so it costs nothing at run time):

- ``"xla"``: the plain einsum/softmax formulation. The reference the others are tested against; used for short
  sequences on TPU and as every backend's fallback.
- ``"batched"``: the CPU choice for short key sequences (cross-attention onto 77 text tokens, CLIP, the
  256-token self-attention at SD's lowest level). Heads moved in front so both products are plain batched
  matmuls over (batch, heads) and the softmax normalised after the PV product, on (queries, head_dim)
  instead of (queries, keys). XLA's CPU backend fuses either formulation into one kernel; on the plain
  path's (batch, length, heads) operand layout that kernel is 2-6x slower (the tiny model's
  cross-attention: 12 ms against 2 ms).
- ``"chunked"``: a memory-efficient blocked formulation for long sequences on CPU and TPU (SD's 4096-token
  self-attention at 64x64 latents, the VAE's single-head 512-dim mid-block attention). A `lax.map` over
  (batch*head, query chunk) blocks; each block is one (q_chunk, keys) fp32 score tile (about 16 MB) with the
  softmax max-subtracted and exponentiated in fp32 and the normalisation applied after the PV product. Key
  sequences longer than `MAX_KEY_BLOCK` are walked in `k_chunk` pieces with an online (flash-style) softmax.
  It never materialises the (batch, heads, Lq, Lk) score array, and on a 2-core CPU it is about 4x faster
  than the plain version (8x faster than `jax.nn.dot_product_attention`) at 4096 tokens and within
  1.2-1.6x of PyTorch's SDPA (see scripts/bench_attention.py).
- ``"cudnn"``: `jax.nn.dot_product_attention(..., implementation="cudnn")` (cuDNN flash attention) on NVIDIA
  GPUs for fp16/bf16 inputs without a mask and with a head dim cuDNN supports (a multiple of 8, <= 128, or
  <= 256 on Hopper and later). Anything else, or any platform other than CUDA, falls back to ``"xla"``.

Choosing: an explicit ``implementation=`` argument wins, then `set_attention_implementation(...)`, then the
``SEGA_JAX_ATTENTION`` environment variable, then the automatic choice (`select_implementation`). Because the
choice is made at trace time, changing it does not affect functions that are already compiled.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from sega_jax.models.placement import map_into

Array = jax.Array

IMPLEMENTATIONS = ("xla", "chunked", "batched", "cudnn")
ENV_VAR = "SEGA_JAX_ATTENTION"

# Automatic choice on CPU/TPU: the chunked backend from this many keys and this many scores per (batch, head).
# Measured on a 2-core Xeon (scripts/bench_attention.py): chunked is 1.5-2x faster at 1024x1024 and ~4x at
# 4096x4096, and the same speed as the plain one at 256x256 and for 4096 queries onto 77 keys.
CHUNKED_MIN_KEYS = 512
CHUNKED_MIN_SCORES = 512 * 512
# Score elements per block (q_chunk * key block): 2**22 fp32 = 16 MB (1024 queries x 4096 keys), the
# measured optimum on CPU: 2**20 was 15-25% slower, 2**23 the same, 2**24 (one 4096x4096 tile) 1.9x slower.
BLOCK_ELEMENTS = 2**22
# Keys up to this many are handled in one block (exact softmax per query chunk); beyond, online softmax over
# chunks of `K_CHUNK` keys.
MAX_KEY_BLOCK = 16384
K_CHUNK = 4096

_F32 = jnp.float32
_NEG = float(jnp.finfo(jnp.float32).min)  # the plain path's masked-score value
_forced: str | None = None


def _check(name: str | None, what: str) -> str | None:
    if name is None or name in ("", "auto"):
        return None
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{what} must be one of {IMPLEMENTATIONS}, 'auto' or None, got {name!r}")
    return name


def set_attention_implementation(name: str | None) -> None:
    """Force a backend for every later trace ("xla", "chunked", "batched", "cudnn"), or None/"auto" for
    automatic."""
    global _forced
    _forced = _check(name, "attention implementation")


def get_attention_implementation() -> str | None:
    """The forced backend (from `set_attention_implementation`, else the env var); None if automatic."""
    if _forced is not None:
        return _forced
    return _check(os.environ.get(ENV_VAR), f"${ENV_VAR}")


@contextlib.contextmanager
def attention_implementation(name: str | None) -> Iterator[None]:
    """Context manager form of `set_attention_implementation` (restores the previous setting)."""
    global _forced
    previous = _forced
    set_attention_implementation(name)
    try:
        yield
    finally:
        _forced = previous


def _platform() -> str:
    """'cpu', 'tpu', 'cuda', 'rocm' or another backend name, for the default device."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    try:
        version = str(jax.devices()[0].client.platform_version).lower()
    except Exception:  # any failure to introspect: assume the common case
        version = "cuda"
    return "rocm" if "rocm" in version else "cuda"


def _cudnn_max_head_dim() -> int:
    try:
        major = int(str(jax.devices()[0].compute_capability).split(".")[0])
    except Exception:
        return 128
    return 256 if major >= 9 else 128


def cudnn_supported(q_shape, k_shape, dtype, *, has_mask: bool, platform: str | None = None,
                    max_head_dim: int | None = None) -> bool:
    """Whether cuDNN flash attention can take this call (CUDA, fp16/bf16, no mask, supported head dim)."""
    platform = _platform() if platform is None else platform
    if platform != "cuda" or has_mask:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
        return False
    head_dim = q_shape[-1]
    max_head_dim = _cudnn_max_head_dim() if max_head_dim is None else max_head_dim
    return head_dim % 8 == 0 and head_dim <= max_head_dim and q_shape[2] == k_shape[2]


def select_implementation(q_shape, k_shape, dtype, *, has_mask: bool = False, platform: str | None = None,
                          implementation: str | None = None, max_head_dim: int | None = None) -> str:
    """The backend `dot_product_attention` uses for these shapes (pure function of its arguments and the
    forced setting; `platform` defaults to the default backend's: 'cpu', 'tpu', 'cuda', 'rocm', ...)."""
    platform = _platform() if platform is None else platform
    name = _check(implementation, "implementation")
    if name is None:
        name = get_attention_implementation()
    cudnn_ok = lambda: cudnn_supported(q_shape, k_shape, dtype, has_mask=has_mask, platform=platform,
                                       max_head_dim=max_head_dim)
    if name == "cudnn":
        return "cudnn" if cudnn_ok() else "xla"
    if name is not None:
        return name
    # Automatic.
    if platform == "cuda":
        return "cudnn" if cudnn_ok() else "xla"
    if platform in ("cpu", "tpu"):
        lq, lk = q_shape[1], k_shape[1]
        if lk >= CHUNKED_MIN_KEYS and lq * lk >= CHUNKED_MIN_SCORES:
            return "chunked"
    return "batched" if platform == "cpu" else "xla"


def _pv_dtype(v_dtype) -> jnp.dtype:
    """The dtype the probabilities and v meet in for the PV product: v's (the plain path's choice, what half-
    precision matrix units want), except on CPU, where XLA computes half-precision products in fp32 anyway
    and casting each (queries, keys) probability tile was a pass of its own (the tiny UNet's bf16 loop: 7 of
    its 75 ms per step). There fp32 probabilities meet v upcast, and are rounded nowhere."""
    return _F32 if _platform() == "cpu" else jnp.dtype(v_dtype)


def xla_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None) -> Array:
    """The plain formulation: full fp32 scores, fp32 softmax, probabilities cast to v's dtype for PV."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)


def batched_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None) -> Array:
    """`xla_attention` as heads-first batched matmuls with the normalisation after PV (1e-6 relative in fp32).

    Scores, softmax and the normalisation are fp32; the probabilities are cast to v's dtype for PV, as in
    the plain path. A fully masked query row gets the plain path's answer (the mean of v over all keys).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    out_dtype = jnp.result_type(q.dtype, v.dtype)
    heads_first = lambda t: jnp.swapaxes(t, 1, 2)
    qt, kt, vt = heads_first(q), heads_first(k), heads_first(v)
    if q.dtype == _F32 or _platform() == "cpu":
        # Fold the scale into the shorter of q and k (in fp32 for half precision on CPU, where XLA computes
        # these products in fp32 anyway). A scale applied to the scores or to a long q became a broadcast
        # operand of XLA:CPU's fused kernel, materialised at that size, shared by every call of that shape
        # and held for the whole program (60 MB for SD 1.5 at 64x64 latents; BENCHMARKS.md, section 1i).
        qt, kt = qt.astype(_F32), kt.astype(_F32)
        qt, kt = (qt, kt * scale) if kt.shape[2] <= qt.shape[2] else (qt * scale, kt)
        scale = 1.0
    scores = jnp.einsum("bhqd,bhkd->bhqk", qt, kt, preferred_element_type=_F32)
    if scale != 1.0:
        scores = scores * scale
    if mask is not None:
        scores = jnp.where(mask, scores, _NEG)
    probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    denom = probs.sum(axis=-1, keepdims=True)
    pv_dtype = _pv_dtype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(pv_dtype), vt.astype(pv_dtype),
                     preferred_element_type=_F32) / denom
    return heads_first(out).astype(out_dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _split(length: int, chunk: int) -> tuple[int, int]:
    """(number of chunks, chunk size) covering `length` with chunks of at most ~`chunk`, little padding."""
    if length <= chunk:
        return 1, length
    n = _cdiv(length, chunk)
    size = _cdiv(_cdiv(length, n), 8) * 8
    return _cdiv(length, size), size


def chunked_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, q_chunk: int | None = None,
                      k_chunk: int | None = None) -> Array:
    """Blocked attention equal to `xla_attention` (1e-6 relative in fp32) without its (B, H, Lq, Lk) scores.

    Blocks of (q_chunk queries) x (all keys, or k_chunk keys with an online softmax) per (batch, head), in
    fp32. Default chunk sizes follow `BLOCK_ELEMENTS`, `MAX_KEY_BLOCK` and `K_CHUNK`. A fully masked query
    row gets the plain path's answer (the mean of v over all keys).
    """
    b, lq, h, d = q.shape
    lk = k.shape[1]
    bh = b * h
    scale = 1.0 / math.sqrt(d)
    out_dtype = jnp.result_type(q.dtype, v.dtype)
    if k_chunk is None:
        k_chunk = lk if lk <= MAX_KEY_BLOCK else K_CHUNK
    nk, kc = _split(lk, k_chunk)
    if q_chunk is None:
        q_chunk = max(16, BLOCK_ELEMENTS // kc)
    nq, qc = _split(lq, q_chunk)
    lq_p, lk_p = nq * qc, nk * kc

    fold = q.dtype == _F32  # fp32: fold the scale into q (exact enough); else scale the fp32 scores
    if fold:
        q = q * scale
    to_blocks = lambda t, n, c, pad: jnp.pad(jnp.swapaxes(t, 1, 2).reshape(bh, t.shape[1], t.shape[3]),
                                             ((0, 0), (0, pad), (0, 0))).reshape(bh, n, c, t.shape[3])
    qt = to_blocks(q, nq, qc, lq_p - lq)  # (bh, nq, qc, d)
    kt = to_blocks(k, nk, kc, lk_p - lk)  # (bh, nk, kc, d)
    vt = to_blocks(v, nk, kc, lk_p - lk)

    if mask is not None:
        mask = jnp.asarray(mask, bool)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        mb, mh, mq, mk = mask.shape
        if mq != 1:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, lq_p - lq), (0, 0)))
        if mk != 1:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, lk_p - lk)))
        mask = mask.reshape(mb, mh, nq if mq != 1 else 1, qc if mq != 1 else 1,
                            nk if mk != 1 else 1, kc if mk != 1 else 1)
    key_padded = lk_p != lk

    pv_dtype = _pv_dtype(v.dtype)
    # On CPU, half-precision blocks meet in fp32 (XLA:CPU computes their product in fp32 anyway), the scale
    # folded into each q block: scaling each (qc, kc) score tile instead was a pass of its own over it.
    fold_per_block = not fold and pv_dtype == _F32

    def scores(qb: Array, kb: Array, mb: Array | None, kj) -> Array:
        if fold_per_block:
            qb, kb = qb.astype(_F32) * scale, kb.astype(_F32)
        s = lax.dot_general(qb, kb, (((1,), (1,)), ((), ())), preferred_element_type=_F32)  # (qc, kc)
        if not (fold or fold_per_block):
            s = s * scale
        if mb is not None:
            s = jnp.where(mb, s, _NEG)
        if key_padded:  # padding keys get exactly zero weight, even in fully masked rows
            s = jnp.where(kj * kc + lax.broadcasted_iota(jnp.int32, (1, kc), 1) < lk, s, -jnp.inf)
        return s

    def pv(p: Array, vb: Array) -> Array:
        return lax.dot_general(p.astype(pv_dtype), vb.astype(pv_dtype), (((1,), (0,)), ((), ())),
                               preferred_element_type=_F32)

    def per_head(i):
        k_i, v_i = kt[i], vt[i]
        m_i = None
        if mask is not None:
            m_i = mask[(i // h) if mask.shape[0] > 1 else 0, (i % h) if mask.shape[1] > 1 else 0]

        def per_query_chunk(j):
            qb = qt[i, j]
            m_j = None if m_i is None else m_i[j if m_i.shape[0] > 1 else 0]  # (qc|1, nk|1, kc|1)
            key_mask = lambda kj: None if m_j is None else m_j[:, kj if m_j.shape[1] > 1 else 0]
            if nk == 1:
                s = scores(qb, k_i[0], key_mask(0), 0)
                p = jnp.exp(s - s.max(axis=-1, keepdims=True))
                return pv(p, v_i[0]) / p.sum(axis=-1, keepdims=True)

            def step(carry, kj):
                o, m, denom = carry
                s = scores(qb, k_i[kj], key_mask(kj), kj)
                m_new = jnp.maximum(m, s.max(axis=-1, keepdims=True))
                p = jnp.exp(s - m_new)
                alpha = jnp.exp(m - m_new)
                denom = denom * alpha + p.sum(axis=-1, keepdims=True)
                return (o * alpha + pv(p, v_i[kj]), m_new, denom), None

            # Start from the masked-score value, not -inf: finite differences everywhere, no NaN.
            init = (jnp.zeros((qc, d), _F32), jnp.full((qc, 1), _NEG, _F32), jnp.zeros((qc, 1), _F32))
            (o, _, denom), _ = lax.scan(step, init, jnp.arange(nk))
            return o / denom

        return lax.map(per_query_chunk, jnp.arange(nq)).astype(pv_dtype)  # (nq, qc, d)

    # Blocks are stored in the PV dtype: on CPU fp32, rounded in the final transpose (rounding each (qc, d)
    # block as it was written cost XLA:CPU 2.4x the write: the tiny UNet's bf16 step, 1 ms of 60).
    out = map_into(per_head, bh, (nq, qc, vt.shape[-1]), pv_dtype, start_after=qt)  # (bh, nq, qc, d)
    out = out.reshape(bh, lq_p, -1)[:, :lq].reshape(b, h, lq, -1)
    return jnp.swapaxes(out, 1, 2).astype(out_dtype)


def cudnn_attention(q: Array, k: Array, v: Array) -> Array:
    """cuDNN flash attention (fp16/bf16 in, fp32 softmax inside cuDNN)."""
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def attention_probabilities(q: Array, k: Array) -> Array:
    """The softmax attention probabilities (batch, heads, q_len, k_len) in fp32 for (batch, length, heads,
    head_dim) queries and keys: what the plain path multiplies v by. For callers that ask to see them
    (attention maps on request); `dot_product_attention` never computes them this way."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=_F32) * scale
    return jax.nn.softmax(scores, axis=-1)


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None,
                          implementation: str | None = None) -> Array:
    """Scaled dot-product attention on (batch, length, heads, head_dim) arrays.

    Scores and softmax are computed in fp32 whatever the input dtype (diffusers' `upcast_attention`
    and `upcast_softmax` behaviour, which is also the right default for bf16/fp16). `mask` is a boolean
    array broadcastable to (batch, heads, q_len, k_len); False entries are excluded. `implementation`
    ("xla", "chunked", "cudnn", "auto"/None) overrides the module setting; see the module docstring.
    """
    name = select_implementation(q.shape, k.shape, q.dtype, has_mask=mask is not None,
                                 implementation=implementation)
    if name == "chunked":
        return chunked_attention(q, k, v, mask=mask)
    if name == "batched":
        return batched_attention(q, k, v, mask=mask)
    if name == "cudnn":
        try:
            return cudnn_attention(q, k, v)
        except (NotImplementedError, ValueError, RuntimeError):  # a shape or cuDNN version it rejects
            pass
    return xla_attention(q, k, v, mask=mask)
