"""Triton kernels of the LSQ fake-quantizer: one pass forward, one pass backward (loaded on first use).

Both kernels see the tensor as ``(outer, C, inner)`` (C = channels sharing one step each; C = 1 per-tensor)
and run on a ``(blocks, C)`` grid: program ``(b, c)`` takes elements ``b*BLOCK ...`` of channel ``c``'s
``outer*inner`` elements. The backward writes ``grad_x`` and one partial sum of the step gradient per
program, which the caller sums per channel in a fixed order (no atomics: deterministic).

Exactness against the torch implementation (kernels.py): ``x/s`` is the IEEE division (``div_rn``), rounded
to the input's dtype as torch does for half types; rounding is half-to-even (``torch.round``), written with
``floor`` because ``libdevice.rint`` is unavailable in Triton's CPU interpreter, which the tests run under
(``TRITON_INTERPRET=1``); NaN propagates through the clamp as in ``torch.clamp``.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

#: set when this module was imported under TRITON_INTERPRET=1: its kernels then run on CPU tensors (tests)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _round_half_even(v):
    f = tl.floor(v)
    d = v - f                                # exact for float32
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)


@triton.jit
def _address(j, c, inner, C, FLAT: tl.constexpr):
    if FLAT:  # outer == 1: channel c owns [c*inner, (c+1)*inner)
        return c * inner + j
    else:
        o = j // inner
        return (o * C + c) * inner + (j - o * inner)


@triton.jit
def _scaled(x, s):
    """x/s as torch computes it in x's dtype (IEEE division, then rounded to x's dtype), as float32."""
    return tl.math.div_rn(x.to(tl.float32), s).to(x.dtype).to(tl.float32)


@triton.jit
def _clamp(v, qn, qp):
    v = tl.maximum(v, qn, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(v, qp, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def lsq_fwd_kernel(x_ptr, s_ptr, out_ptr, per_channel, inner, C, qn, qp, eps,
                   BLOCK: tl.constexpr, FLAT: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1)
    mask = j < per_channel
    addr = _address(j, c, inner, C, FLAT)
    x = tl.load(x_ptr + addr, mask=mask, other=0.0)
    s = tl.maximum(tl.load(s_ptr + c).to(tl.float32), eps)
    r = _round_half_even(_clamp(_scaled(x, s), qn, qp))
    tl.store(out_ptr + addr, (r * s).to(x.dtype), mask=mask)


@triton.jit
def lsq_bwd_kernel(g_ptr, x_ptr, s_ptr, gx_ptr, part_ptr, per_channel, inner, C, nblocks, qn, qp, eps,
                   BLOCK: tl.constexpr, FLAT: tl.constexpr, NEED_X: tl.constexpr, NEED_S: tl.constexpr):
    b = tl.program_id(0)
    c = tl.program_id(1)
    j = b * BLOCK + tl.arange(0, BLOCK)
    mask = j < per_channel
    addr = _address(j, c, inner, C, FLAT)
    x = tl.load(x_ptr + addr, mask=mask, other=0.0)
    g = tl.load(g_ptr + addr, mask=mask, other=0.0)
    s = tl.maximum(tl.load(s_ptr + c).to(tl.float32), eps)
    v = _scaled(x, s)
    r = _clamp(v, qn, qp)
    inside = r == v
    if NEED_X:  # grad * inside, as torch multiplies (a non-finite upstream value stays NaN outside)
        tl.store(gx_ptr + addr, (g.to(tl.float32) * inside.to(tl.float32)).to(g.dtype), mask=mask)
    if NEED_S:  # inside: round(v) - v; clipped: the bound Qn or Qp; times the upstream gradient
        t = tl.where(inside, _round_half_even(r) - v, r) * g.to(tl.float32)
        tl.store(part_ptr + c * nblocks + b, tl.sum(tl.where(mask, t, 0.0), axis=0))
