"""The LSQ fake-quantizer (Esser et al., 2020): one autograd Function and the module that owns a step.

Everything that rounds a tensor in saq goes through :func:`lsq` / :class:`LSQQuantizer`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["lsq", "qrange", "check_bits", "LSQQuantizer", "NotInitializedError"]

#: smallest step the forward pass will use; keeps a step that an optimizer pushed to <= 0 valid.
STEP_EPS = 1e-8
FLOAT_BITS = 32


class NotInitializedError(RuntimeError):
    """A quantizer was asked to quantize before its step size was initialised."""


def check_bits(bits: int, what: str = "bits") -> int:
    """Validate a bit-width: 2..8, or 32 for 'not quantized'."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"{what} must be an int in 2..8 or 32 (not quantized), got {bits!r}")
    if not (2 <= bits <= 8 or bits == FLOAT_BITS):
        raise ValueError(f"{what} must be in 2..8, or 32 for 'not quantized', got {bits}")
    return bits


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range (Qn, Qp) of a `bits`-bit quantizer: signed [-2^(b-1), 2^(b-1)-1], else [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to `shape` (the step's shape)."""
    if t.shape == shape:
        return t
    # broadcasting aligns trailing dims: sum_to_size also sums the leading dims the step lacks
    return t.sum_to_size(shape)


def _default_grad_scale(numel: int, num_steps: int, qp: int) -> float:
    """LSQ's step-gradient scale 1/sqrt(N*Qp), N = elements sharing one step."""
    return 1.0 / math.sqrt(max(numel // max(num_steps, 1), 1) * qp)


def _codes(x: Tensor, s: Tensor, qn: int, qp: int) -> Tensor:
    """round(clamp(x/s, Qn, Qp)) in one new tensor (``s`` already positive)."""
    return torch.div(x, s).clamp_(qn, qp).round_()


class _LSQFunction(torch.autograd.Function):
    """round(clamp(x/s, Qn, Qp)) * s with the STE for x and the LSQ gradient for s.

    Saves only x and s; the backward recomputes x/s in place instead of keeping temporaries alive.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
        s = step.clamp_min(STEP_EPS)
        out = _codes(x, s, qn, qp).mul_(s)
        ctx.save_for_backward(x, step)
        ctx.qrange = (qn, qp)
        ctx.grad_scale = grad_scale
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        qn, qp = ctx.qrange
        s = step.clamp_min(STEP_EPS)
        v = torch.div(x, s)
        r = v.clamp(qn, qp)
        inside = r == v  # Qn <= x/s <= Qp; one pass instead of two compares and an and
        grad_x = grad * inside if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            # inside: round(v) - v ; outside: the clamped bound Qn or Qp (= round(clamp(v)))
            r.round_().sub_(v.masked_fill_(inside.logical_not_(), 0.0)).mul_(grad)
            grad_s = _reduce_to(r, step.shape).mul_(ctx.grad_scale).to(step.dtype)
        return grad_x, grad_s, None, None, None


def lsq(x: Tensor, step: Tensor, bits: int, signed: bool, grad_scale: Optional[float] = None) -> Tensor:
    """Functional LSQ fake-quantizer.

    Forward: ``round(clamp(x/step, Qn, Qp)) * step``. Backward: straight-through for ``x`` (zero where
    ``x/step`` is clipped) and the LSQ gradient for ``step`` scaled by ``grad_scale``, which defaults to
    ``1/sqrt(N*Qp)`` with N the number of elements sharing one step (``x.numel() / step.numel()``).
    ``step`` is a scalar or broadcasts against ``x`` (per-channel). ``bits == 32`` returns ``x``.
    Raises ValueError for bad bits, a step that does not broadcast, or a non-positive step (checked for
    CPU steps only, to avoid a device synchronisation per call).
    """
    check_bits(bits)
    if bits == FLOAT_BITS:
        return x
    if not torch.is_tensor(step):
        step = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    try:
        broadcasts = step.dim() <= x.dim() and torch.broadcast_shapes(step.shape, x.shape) == x.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise ValueError(f"step of shape {tuple(step.shape)} does not broadcast to x of shape {tuple(x.shape)}")
    # checked where it costs no device synchronisation (CPU steps); elsewhere the forward clamps to STEP_EPS
    if step.device.type == "cpu" and not torch.compiler.is_compiling() and bool((step.detach() <= 0).any()):
        raise ValueError("step sizes must be positive")
    qn, qp = qrange(bits, signed)
    if grad_scale is None:
        grad_scale = _default_grad_scale(x.numel(), step.numel(), qp)
    return _LSQFunction.apply(x, step, qn, qp, float(grad_scale))


class LSQQuantizer(nn.Module):
    """Holds a learned step and quantizes with :func:`lsq`.

    ``channel_dim`` (e.g. 0 for a weight) gives one step per slice along that dim; ``None`` one step for
    the tensor. ``signed=None`` decides the range from the first data seen (signed iff it has negatives),
    so negative activations are never clipped silently. The step is initialised by LSQ's rule
    ``2*mean|x|/sqrt(Qp)`` on the first tensor seen in training mode, or by :func:`saq.calibrate`.
    """

    def __init__(self, bits: int, signed: Optional[bool] = None, channel_dim: Optional[int] = None,
                 num_channels: int = 1, grad_scale: Optional[float] = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.channel_dim = channel_dim
        self.grad_scale = grad_scale
        n = num_channels if channel_dim is not None else 1
        self.step = nn.Parameter(torch.ones(n))
        # flags live in buffers (so they travel in state_dicts and checkpoints) and are mirrored in
        # Python attributes so that the forward pass never reads a device tensor (no GPU sync)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("is_signed", torch.tensor(-1, dtype=torch.int8))  # -1 undecided, 0, 1
        self._initialized = False
        self._signed: Optional[bool] = None
        self.signed = signed
        # calibration accumulators (not saved)
        self._calib: Optional[list] = None

    @property
    def signed(self) -> Optional[bool]:
        return self._signed

    @signed.setter
    def signed(self, value: Optional[bool]) -> None:
        self._signed = None if value is None else bool(value)
        self.is_signed.fill_(-1 if value is None else int(bool(value)))

    @property
    def is_initialized(self) -> bool:
        return self._initialized

    def _sync_flags(self) -> None:
        self._initialized = bool(self.initialized)
        v = int(self.is_signed)
        self._signed = None if v < 0 else bool(v)

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.bits != FLOAT_BITS

    def extra_repr(self) -> str:
        kind = "per-tensor" if self.channel_dim is None else f"per-channel(dim={self.channel_dim}, n={self.step.numel()})"
        return f"bits={self.bits}, signed={self.signed}, {kind}"

    def _step_view(self, x: Tensor) -> Tensor:
        if self.channel_dim is None:
            return self.step.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return self.step.view(shape)

    def _reduce_dims(self, x: Tensor) -> list[int]:
        return [d for d in range(x.dim()) if d != self.channel_dim]

    @torch.no_grad()
    def _mean_abs(self, x: Tensor) -> Tensor:
        if self.channel_dim is None:
            return x.abs().mean().reshape(1)
        return x.abs().mean(dim=self._reduce_dims(x))

    @torch.no_grad()
    def init_from(self, x: Tensor, mean_abs: Optional[Tensor] = None) -> None:
        """LSQ initialisation from data: step = 2*mean|x|/sqrt(Qp) (per channel where the step is)."""
        if self.signed is None:
            self.signed = bool((x < 0).any())
        if mean_abs is None:
            mean_abs = self._mean_abs(x)
        _, qp = qrange(self.bits, self.signed)
        step = 2.0 * mean_abs.to(self.step) / math.sqrt(qp)
        # a channel that is all zeros would get step 0: fall back to a tiny positive step
        self.step.copy_(step.clamp_min(1e-6).reshape(self.step.shape))
        self.initialized.fill_(True)
        self._initialized = True

    def start_calibration(self) -> None:
        self._calib = [0, None, False]  # batches, sum of mean|x|, saw negatives

    @torch.no_grad()
    def finish_calibration(self) -> None:
        if self._calib is None or self._calib[0] == 0:
            self._calib = None
            return
        n, total, neg = self._calib
        self._calib = None
        if self.signed is None:
            self.signed = neg
        self.init_from(torch.zeros(()), mean_abs=total / n)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self._calib is not None:  # calibration: collect statistics, do not quantize
            with torch.no_grad():
                m = self._mean_abs(x.detach().float())
                self._calib[0] += 1
                self._calib[1] = m if self._calib[1] is None else self._calib[1] + m
                self._calib[2] = self._calib[2] or bool((x < 0).any())
            return x
        if not self._initialized:
            if not self.training:
                raise NotInitializedError(
                    "quantizer step sizes are not initialised: run saq.calibrate(model, batches) or one "
                    "forward pass in training mode before evaluating (or load a quantized checkpoint)")
            self.init_from(x.detach().float())
        if self.channel_dim is not None and x.shape[self.channel_dim] != self.step.numel():
            raise ValueError(f"per-channel quantizer has {self.step.numel()} steps but the tensor has "
                             f"{x.shape[self.channel_dim]} channels along dim {self.channel_dim}")
        qn, qp = qrange(self.bits, bool(self.signed))
        step = self._step_view(x)
        g = self.grad_scale
        if g is None:
            g = _default_grad_scale(x.numel(), self.step.numel(), qp)
        return _LSQFunction.apply(x, step.to(x.dtype), qn, qp, g)

    def integer(self, x: Tensor) -> Tensor:
        """The integer codes round(clamp(x/s)) that :meth:`forward` multiplies by s (for export)."""
        qn, qp = qrange(self.bits, bool(self.signed))
        return _codes(x, self._step_view(x).detach().clamp_min(STEP_EPS), qn, qp)

    # -- state: a float state_dict (no step / flags) loads into a converted model -------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in ("step", "initialized", "is_signed"):
            if prefix + key in missing_keys and prefix + key not in before:
                missing_keys.remove(prefix + key)
        self._sync_flags()
