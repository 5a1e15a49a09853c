"""The LSQ fake-quantizer's maths, and the same maths as one custom op with a fused Triton kernel on CUDA.

* :func:`lsq_forward` / :func:`lsq_backward` -- LSQ in torch ops (what :func:`torchsaq.lsq` runs by default).
* ``torch.ops.torchsaq.lsq(x, step, qn, qp, grad_scale)`` -- the same function registered through
  ``torch.library`` (autograd formula, fake tensor implementation), so ``torch.compile`` and
  ``torch.export`` see one op. On CUDA it runs two Triton kernels (_triton_lsq.py): the forward in one pass,
  the backward in one pass (``grad_x`` and per-block step-gradient sums, reduced in a fixed order). Where
  Triton cannot run (CPU tensors, no Triton, a step varying along more than one dim) it runs the torch maths.

Which one the quantizers use is :func:`set_lsq_backend`: ``"autograd"`` (default, an autograd Function
over the torch maths: what inductor fuses under ``torch.compile``) or ``"triton"`` (the op). Opt-in until
the kernel has been timed against PyTorch's learnable fake-quantize on GPUs (benchmarks/lsq_speed.py).
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ..registry import Registry

__all__ = ["LSQ_BACKENDS", "STEP_EPS", "lsq_forward", "lsq_backward", "set_lsq_backend", "get_lsq_backend",
           "triton_available"]

#: implementations of the LSQ fake-quantizer (:func:`set_lsq_backend`, ``torchsaq train --lsq-backend``)
LSQ_BACKENDS: Registry[None] = Registry("LSQ backend")
LSQ_BACKENDS.register("autograd", None, description="an autograd Function over torch ops (what torch.compile fuses)")
LSQ_BACKENDS.register("triton", None,
                      description="the custom op torchsaq::lsq: one fused Triton kernel each way, CUDA only")

#: smallest step the forward pass will use; keeps a step that an optimizer pushed to <= 0 valid
STEP_EPS = 1e-8

_BACKEND = "autograd"
_TRITON: Optional[ModuleType] = None  # _triton_lsq once imported


# -- the maths in torch ops --------------------------------------------------------------------------------
def _codes(x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """round(clamp(x/s, Qn, Qp)) in one new tensor (``s`` already positive)."""
    return torch.div(x, s).clamp_(qn, qp).round_()


def lsq_forward(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """``round(clamp(x/s, Qn, Qp)) * s`` with ``s = max(step, STEP_EPS)`` (``step`` broadcasts to ``x``)."""
    s = step.clamp_min(STEP_EPS)
    return _codes(x, s, qn, qp).mul_(s)


def lsq_backward(grad: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float,
                 need_x: bool = True, need_s: bool = True) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """LSQ's gradients: straight-through for ``x`` (zero where ``x/s`` is clipped), and for ``step``
    ``grad_scale * sum(grad * (round(v) - v if inside else the clipped bound))`` reduced to ``step``'s shape.

    Recomputes ``x/s`` instead of keeping the forward's temporaries alive. Every pass is a floating-point op:
    on the CPU, ops that read or write bool tensors (``grad * mask``, ``masked_fill``, ``where``) are not
    vectorised and cost 10-30x a float pass (benchmarks/lsq_speed.py), so the mask is written as 0/1 in x's
    dtype by ``eq(..., out=)``.
    """
    s = step.clamp_min(STEP_EPS)
    v = torch.div(x, s)
    r = v.clamp(qn, qp)
    # the step-gradient term: inside, round(v) - v; outside, the clamped bound Qn or Qp (= round(clamp(v)));
    # both are round(r) - r * inside
    term: Optional[Tensor] = None
    if torch.is_grad_enabled():  # the backward is itself differentiated (create_graph=True: Hessian-vector
        inside = (r == v).to(v.dtype)  # products): out of place, nothing saved is overwritten
        grad_x = grad * inside if need_x else None
        if need_s:
            term = (r.round() - r * inside) * grad
    else:
        inside = torch.eq(r, v, out=v)  # in v's buffer: 1 where Qn <= x/s <= Qp (NaN: 0), else 0
        grad_x = grad * inside if need_x else None
        if need_s:
            r_inside = inside.mul_(r)  # before r is rounded
            term = r.round_().sub_(r_inside).mul_(grad)
    grad_s = None if term is None else _reduce_to(term, step.shape).mul_(grad_scale).to(step.dtype)
    return grad_x, grad_s


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape` (the step's shape)."""
    if t.shape == shape:
        return t
    # broadcasting aligns trailing dims: sum_to_size also sums the leading dims the step lacks
    return t.sum_to_size(shape)


# -- backend choice ----------------------------------------------------------------------------------------
def triton_available() -> bool:
    """Whether Triton imports (it ships with PyTorch's CUDA wheels on Linux)."""
    try:
        _triton()
    except ImportError:
        return False
    return True


def set_lsq_backend(name: str) -> None:
    """Choose what LSQ quantizers run: ``"autograd"`` (torch ops, default) or ``"triton"`` (the custom op).

    Raises ValueError for another name and ImportError for ``"triton"`` without Triton.
    """
    global _BACKEND
    if name not in LSQ_BACKENDS:
        raise ValueError(f"unknown LSQ backend {name!r}; choose one of {', '.join(LSQ_BACKENDS)}")
    if name == "triton" and not triton_available():
        raise ImportError("the 'triton' LSQ backend needs Triton (pip install triton; PyTorch's CUDA wheels "
                          "for Linux bring it)")
    _BACKEND = name


def get_lsq_backend() -> str:
    """The LSQ backend :func:`set_lsq_backend` chose."""
    return _BACKEND


def use_op() -> bool:
    """Whether quantizers should call the custom op (backend "triton", not inside ONNX export, whose
    TorchScript tracer knows only aten ops)."""
    return _BACKEND == "triton" and not torch.onnx.is_in_onnx_export()


def _triton() -> ModuleType:
    global _TRITON
    if _TRITON is None:
        from . import _triton_lsq  # imports triton: loaded only when the op first meets a CUDA tensor
        _TRITON = _triton_lsq
    return _TRITON


# -- the Triton path ---------------------------------------------------------------------------------------
def _layout(x: Tensor, step: Tensor) -> Optional[tuple[int, int, int]]:
    """``(outer, C, inner)`` when ``step`` (broadcasting to ``x``) varies along at most one dim; else None."""
    if step.numel() == 1:
        return 1, 1, x.numel()
    sizes = [1] * (x.dim() - step.dim()) + list(step.shape)
    dims = [d for d, n in enumerate(sizes) if n != 1]
    if len(dims) != 1:
        return None
    d = dims[0]
    return math.prod(x.shape[:d]), x.shape[d], math.prod(x.shape[d + 1:])


def _triton_ok(x: Tensor, step: Tensor) -> Optional[tuple[int, int, int]]:
    """The layout Triton runs on, or None where the torch maths must run."""
    if x.numel() == 0 or x.numel() >= 2**31 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    if x.device.type != "cuda" and not (x.device.type == "cpu" and _TRITON is not None and _TRITON.INTERPRET):
        return None
    if x.device.type == "cuda" and not triton_available():
        return None
    lay = _layout(x, step)
    if lay is None or lay[1] > 65535:  # the grid's second dim
        return None
    return lay


def _dense(x: Tensor, per_tensor: bool) -> tuple[Tensor, torch.memory_format]:
    """``x`` in a layout whose storage order the kernels can walk: per-tensor any of the two dense formats,
    per-channel row-major."""
    if per_tensor and x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, torch.channels_last
    return x.contiguous(), torch.contiguous_format


def _fwd_triton(x: Tensor, step: Tensor, qn: int, qp: int, lay: tuple[int, int, int]) -> Tensor:
    tri = _triton()
    outer, c, inner = lay
    x, fmt = _dense(x, c == 1)
    out = torch.empty_like(x, memory_format=fmt)
    per_channel = outer * inner
    grid = (tri.triton.cdiv(per_channel, tri.BLOCK), c)
    tri.lsq_fwd_kernel[grid](x, step.reshape(-1).contiguous(), out, per_channel, inner, c, float(qn), float(qp),
                             STEP_EPS, BLOCK=tri.BLOCK, FLAT=outer == 1, num_warps=tri.NUM_WARPS)
    return out


def _bwd_triton(grad: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float, need_x: bool,
                need_s: bool, lay: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    tri = _triton()
    outer, c, inner = lay
    x, fmt = _dense(x, c == 1)
    grad = grad.contiguous(memory_format=fmt)
    per_channel = outer * inner
    nblocks = tri.triton.cdiv(per_channel, tri.BLOCK)
    gx = torch.empty_like(grad, memory_format=fmt) if need_x else grad.new_empty(0)
    part = torch.empty((c, nblocks), dtype=torch.float32, device=x.device) if need_s else \
        x.new_empty(0, dtype=torch.float32)
    tri.lsq_bwd_kernel[(nblocks, c)](grad, x, step.reshape(-1).contiguous(), gx, part, per_channel, inner, c,
                                     nblocks, float(qn), float(qp), STEP_EPS, BLOCK=tri.BLOCK, FLAT=outer == 1,
                                     NEED_X=need_x, NEED_S=need_s, num_warps=tri.NUM_WARPS)
    gs = part.sum(1).mul_(grad_scale).to(step.dtype).reshape(step.shape) if need_s else step.new_empty(0)
    return gx, gs


# -- the custom op -----------------------------------------------------------------------------------------
@torch.library.custom_op("torchsaq::lsq", mutates_args=())
def lsq_op(x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
    """LSQ fake-quantize as one op; ``grad_scale`` only enters the backward."""
    lay = _triton_ok(x, step)
    return lsq_forward(x, step, qn, qp) if lay is None else _fwd_triton(x, step, qn, qp, lay)


@lsq_op.register_fake
def _(x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("torchsaq::lsq_backward", mutates_args=())
def lsq_backward_op(grad: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float, need_x: bool,
                    need_s: bool) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_step)`` of :func:`lsq_op`; an unneeded one is an empty tensor."""
    lay = _triton_ok(x, step)
    if lay is not None:
        return _bwd_triton(grad, x, step, qn, qp, grad_scale, need_x, need_s, lay)
    gx, gs = lsq_backward(grad, x, step, qn, qp, grad_scale, need_x, need_s)
    return (grad.new_empty(0) if gx is None else gx), (step.new_empty(0) if gs is None else gs)


@lsq_backward_op.register_fake
def _(grad: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float, need_x: bool,
      need_s: bool) -> tuple[Tensor, Tensor]:
    return (torch.empty_like(grad) if need_x else grad.new_empty(0)), \
        (torch.empty_like(step) if need_s else step.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, step, qn, qp, grad_scale = inputs
    ctx.save_for_backward(x, step)
    ctx.args = (qn, qp, grad_scale)


def _backward(ctx, grad: Tensor):
    x, step = ctx.saved_tensors
    need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    gx, gs = lsq_backward_op(grad, x, step, *ctx.args, need_x, need_s)
    return (gx if need_x else None), (gs if need_s else None), None, None, None


lsq_op.register_autograd(_backward, setup_context=_setup_context)
