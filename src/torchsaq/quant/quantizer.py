"""The fake-quantizers: LSQ (Esser et al., 2020) and the official SAQ code's LIQ_wn, behind one interface.

Everything that rounds a tensor in saq goes through this module. :class:`Quantizer` is what a quantized
layer, :func:`saq.calibrate`, export, summary and the sharpness-aware optimizer use; it has two kinds:

* ``"lsq"``: :class:`LSQQuantizer`, a learned step (:func:`lsq` is the functional form);
* ``"liq"``: :class:`LIQWeightQuantizer` / :class:`LIQActQuantizer`, a learned clip value (docs/method.md, "LIQ_wn").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .kernels import STEP_EPS, _codes, lsq_backward, lsq_forward, use_op
from ..registry import Registry

__all__ = ["lsq", "qrange", "check_bits", "Quantizer", "LSQQuantizer", "LIQWeightQuantizer", "LIQActQuantizer",
           "make_quantizers", "QUANTIZERS", "NotInitializedError", "AffineCodes", "register_quantizer", "QuantizerKind",
           "LSQOptions", "NoOptions", "options_of"]

#: bits meaning "not quantized"
FLOAT_BITS = 32
_STD_EPS = 1e-5  # LSQ's weight_standardize: (w - mean) / (std + eps)


class NotInitializedError(RuntimeError):
    """A quantizer was asked to quantize before its scale (LSQ step, LIQ clip) was initialised."""


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


def _default_grad_scale(numel: int, num_steps: int, qp: int) -> float:
    """LSQ's step-gradient scale 1/sqrt(N*Qp), N = elements sharing one step."""
    return 1.0 / math.sqrt(max(numel // max(num_steps, 1), 1) * qp)


class _LSQFunction(torch.autograd.Function):
    """round(clamp(x/s, Qn, Qp)) * s with the STE for x and the LSQ gradient for s (kernels.py has the maths).

    Saves only x and s; the backward recomputes x/s instead of keeping temporaries alive.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.args = (qn, qp, grad_scale)
        return lsq_forward(x, step, qn, qp)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, step = ctx.saved_tensors
        qn, qp, grad_scale = ctx.args
        gx, gs = lsq_backward(grad, x, step, qn, qp, grad_scale, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return gx, gs, None, None, None


def _apply_lsq(x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
    """LSQ through the backend :func:`torchsaq.kernels.set_lsq_backend` chose."""
    if use_op():
        return torch.ops.torchsaq.lsq(x, step, qn, qp, grad_scale)
    return _LSQFunction.apply(x, step, qn, qp, grad_scale)


def lsq(x: Tensor, step: Tensor, bits: int, signed: bool, grad_scale: Optional[float] = None) -> Tensor:
    """Functional LSQ fake-quantizer.

    Forward: ``round(clamp(x/step, Qn, Qp)) * step``. Backward: straight-through for ``x`` (zero where
    ``x/step`` is clipped) and the LSQ gradient for ``step`` scaled by ``grad_scale``, which defaults to
    ``1/sqrt(N*Qp)`` with N the number of elements sharing one step (``x.numel() / step.numel()``): right
    for weights; for activations LSQ counts one sample's elements, so pass ``grad_scale`` (as
    :class:`LSQQuantizer` with ``per_sample_grad_scale=True`` does).
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
    return _apply_lsq(x, step, qn, qp, float(grad_scale))


class _RoundSTE(torch.autograd.Function):
    """round(x) forward, identity backward (the straight-through estimator of the official code)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


@dataclass
class AffineCodes:
    """Integer weight codes as a format without the quantizer's own op stores them (ONNX DequantizeLinear):
    ``value = (ints - zero_point) * scale (+ shift)``, ``ints`` in ``[lo, hi]``, ``scale`` per tensor (0-d) or
    per channel along ``axis``; with ``block_size`` set, ``scale`` is ``[channels, groups]``: one per block of
    ``block_size`` consecutive elements of each channel's row (the weight flattened to ``[channels, -1]``)."""

    ints: Tensor
    scale: Tensor
    axis: Optional[int]
    lo: int
    hi: int
    zero_point: int = 0
    shift: Optional[Tensor] = None
    block_size: Optional[int] = None


class Quantizer(nn.Module):
    """The interface every fake-quantizer of a layer offers (LSQ and LIQ subclass it).

    One learned scale parameter (:attr:`scale`, stored as ``param_name``: LSQ's ``step``, LIQ's ``clip``),
    a bit-width (``32``: disabled, the input is returned and the parameter frozen, as it never gets a
    gradient), a signedness (``None``: decided from the first data, so negative values are never clipped
    silently), an initialisation from data (the first tensor seen in training mode, or
    :func:`saq.calibrate`), and integer codes for export (:meth:`integer`, :meth:`dequantize`).
    """

    kind: str = ""
    param_name: str = "step"
    #: False: the scale is computed from each input (a dynamic quantizer); ``param_name`` then names a fixed
    #: placeholder buffer (1.0), not a parameter, so the model has nothing to learn for it
    learned: bool = True
    #: the quantizer standardises its input itself (LIQ weights); load_exported turns it off for grid weights
    standardize: bool = False
    # buffers registered in __init__ (declared for type checkers: nn.Module's __getattr__ is untyped)
    initialized: Tensor
    is_signed: Tensor

    def __init__(self, bits: int, signed: Optional[bool] = None, channel_dim: Optional[int] = None,
                 num_channels: int = 1):
        super().__init__()
        self.channel_dim = channel_dim
        n = num_channels if channel_dim is not None else 1
        if self.learned:
            setattr(self, self.param_name, nn.Parameter(torch.ones(n)))
        else:
            self.register_buffer(self.param_name, torch.ones(n))
        # flags live in buffers (so they travel in state_dicts and checkpoints) and are mirrored in
        # Python attributes so that the forward pass never reads a device tensor (no GPU sync)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("is_signed", torch.tensor(-1, dtype=torch.int8))  # -1 undecided, 0, 1
        self._initialized = False
        self._signed: Optional[bool] = None
        self.bits = bits
        self.signed = signed
        # calibration accumulators (not saved)
        self._calib: Optional[list] = None

    # -- state ---------------------------------------------------------------------------------------
    @property
    def scale(self) -> nn.Parameter:
        """The learned parameter: LSQ's step, LIQ's clip."""
        return getattr(self, self.param_name)

    @property
    def bits(self) -> int:
        """The bit-width; setting 32 (disabled) freezes the scale, which then never gets a gradient."""
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        self._bits = check_bits(value)
        if self.learned:
            self.scale.requires_grad_(self._bits != FLOAT_BITS)

    @property
    def signed(self) -> Optional[bool]:
        """Whether the input's range is signed; ``None`` until decided from the first data."""
        return self._signed

    @signed.setter
    def signed(self, value: Optional[bool]) -> None:
        self._signed = None if value is None else bool(value)
        self.is_signed.fill_(-1 if value is None else int(bool(value)))

    @property
    def is_initialized(self) -> bool:
        """Whether the scale has been initialised (from data, a checkpoint or an export)."""
        return self._initialized

    @property
    def enabled(self) -> bool:
        """False at 32 bits (not quantized)."""
        return self.bits != FLOAT_BITS

    def _sync_flags(self) -> None:
        self._initialized = bool(self.initialized)
        v = int(self.is_signed)
        self._signed = None if v < 0 else bool(v)

    def extra_repr(self) -> str:
        kind = ("per-tensor" if self.channel_dim is None
                else f"per-channel(dim={self.channel_dim}, n={self.scale.numel()})")
        return f"bits={self.bits}, signed={self.signed}, {kind}"

    def _scale_view(self, x: Tensor) -> Tensor:
        """The scale parameter shaped to broadcast against ``x``."""
        if self.channel_dim is None:
            return self.scale.reshape(())
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return self.scale.view(shape)

    # -- initialisation ------------------------------------------------------------------------------
    @torch.no_grad()
    def _mean_abs(self, x: Tensor) -> Tensor:
        if self.channel_dim is None:
            return x.abs().mean().reshape(1)
        return x.abs().mean(dim=[d for d in range(x.dim()) if d != self.channel_dim])

    def _statistic(self, x: Tensor) -> Tensor:
        """The data statistic the scale is initialised from (averaged over calibration batches)."""
        return self._mean_abs(x)

    @torch.no_grad()
    def init_from(self, x: Tensor, stat: Optional[Tensor] = None) -> None:
        """Decide the signedness (if undecided) and initialise the scale from data (each kind's own rule)."""
        if self.signed is None:
            self.signed = bool((x < 0).any())
        self._init_scale(self._statistic(x) if stat is None else stat)
        self.initialized.fill_(True)
        self._initialized = True

    def _init_scale(self, stat: Tensor) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def bind(self, weight_shape: torch.Size, name: str) -> None:
        """Called by the layer ``name`` that quantizes a weight of ``weight_shape`` with this quantizer, once,
        before any data: a kind whose scale's shape depends on the weight's (LSQ's groups) shapes it here, and
        refuses a weight it cannot quantize with a one-line ValueError naming the layer."""

    def start_calibration(self) -> None:
        """Collect statistics on the next forward passes instead of quantizing (see :func:`saq.calibrate`)."""
        self._calib = [0, None, False]  # batches, sum of the statistic, saw negatives

    @torch.no_grad()
    def finish_calibration(self) -> None:
        """Initialise from the statistics collected since :meth:`start_calibration`."""
        if self._calib is None or self._calib[0] == 0:
            self._calib = None
            return
        n, total, neg = self._calib
        self._calib = None
        if self.signed is None:
            self.signed = neg
        self.init_from(torch.zeros(()), stat=total / n)

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: Tensor, samples: int = 1) -> Tensor:
        """Fake-quantize ``x``, which holds ``samples`` samples (used by LSQ's per-sample gradient scale)."""
        if not self.enabled:
            return x
        if self._calib is not None:  # calibration: collect statistics, do not quantize
            with torch.no_grad():
                m = self._statistic(x.detach().float())
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
        if self.channel_dim is not None and x.shape[self.channel_dim] != self.scale.shape[0]:
            raise ValueError(f"per-channel quantizer has {self.scale.shape[0]} channels of steps but the tensor has "
                             f"{x.shape[self.channel_dim]} channels along dim {self.channel_dim}")
        return self._quantize(x, samples)

    def _quantize(self, x: Tensor, samples: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- integer codes (export) ----------------------------------------------------------------------
    def code_range(self) -> tuple[int, int]:  # pragma: no cover - abstract
        """The integer range of :meth:`integer`'s codes."""
        raise NotImplementedError

    def integer(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The integer codes of ``x`` (float tensor of whole numbers in :meth:`code_range`)."""
        raise NotImplementedError

    def dequantize(self, codes: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The values the forward pass gives for ``codes`` (bit-exact: ``dequantize(integer(x))``)."""
        raise NotImplementedError

    def step_size(self) -> Tensor:  # pragma: no cover - abstract
        """The spacing between adjacent levels (per channel where the scale is), detached."""
        raise NotImplementedError

    def affine(self, codes: Tensor) -> list[AffineCodes]:
        """The weight ``codes`` (of :meth:`integer`) as affine integer forms, the preferred first (an export format
        takes the first its integer containers hold). Empty: no affine form."""
        return []

    def standardized(self, w: Tensor) -> Tensor:
        """The tensor this quantizer rounds for the input ``w``: ``w`` itself, or its standardisation where the
        quantizer standardises (``standardize``: LSQ's ``weight_standardize``, LIQ_wn's weights)."""
        return w

    # -- state: a float state_dict (no scale / flags) loads into a converted model ------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        before = set(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for key in (self.param_name, "initialized", "is_signed"):
            if prefix + key in missing_keys and prefix + key not in before:
                missing_keys.remove(prefix + key)
        self._sync_flags()


class LSQQuantizer(Quantizer):
    """Holds a learned step and quantizes with LSQ (:func:`lsq`).

    ``channel_dim`` (e.g. 0 for a weight) gives one step per slice along that dim; ``None`` one step for
    the tensor. The step is initialised by LSQ's rule ``2*mean|x|/sqrt(Qp)``. The step-gradient scale is
    ``grad_scale`` if given, else ``1/sqrt(N*Qp)`` with N the elements sharing one step; with
    ``per_sample_grad_scale=True`` (activations, as in the LSQ paper) N counts one of the ``samples``
    samples of the input only, so the step's effective learning rate does not change with the batch size.
    """

    kind = "lsq"
    param_name = "step"
    step: nn.Parameter

    def __init__(self, bits: int, signed: Optional[bool] = None, channel_dim: Optional[int] = None,
                 num_channels: int = 1, grad_scale: Optional[float] = None, per_sample_grad_scale: bool = False,
                 standardize: bool = False, group_size: Optional[int] = None):
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1 or channel_dim != 0):
            raise ValueError(f"group_size must be a positive int on a weight quantizer (channel_dim=0), got "
                             f"{group_size!r}")
        super().__init__(bits, signed, channel_dim, num_channels)
        self.grad_scale = grad_scale
        self.per_sample_grad_scale = per_sample_grad_scale
        self.standardize = standardize
        self.group_size = group_size

    def bind(self, weight_shape: torch.Size, name: str) -> None:
        """With ``group_size`` G: one step per group of G consecutive elements of each output row (the weight
        flattened to ``[out, -1]``: a Linear's ``in`` inputs, a convolution's ``in * kh * kw``), so the step is
        ``[out, row / G]``; a row that G does not divide is a ValueError naming the layer."""
        if self.group_size is None:
            return
        row = math.prod(weight_shape[1:])
        if row % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide the {row} input elements per output of "
                             f"layer {name} (weight {tuple(weight_shape)}): choose a divisor or exclude the layer")
        self.set_groups(weight_shape[0], row // self.group_size)

    def set_groups(self, channels: int, groups: int) -> None:
        """Shape the step ``[channels, groups]`` (all ones, not initialised) for ``group_size``-element groups."""
        self.step = nn.Parameter(torch.ones(channels, groups, device=self.step.device, dtype=self.step.dtype),
                                 requires_grad=self.enabled)
        self.initialized.fill_(False)
        self._initialized = False

    def _groups(self, x: Tensor) -> Tensor:
        """``x`` as ``[out, groups, group_size]`` (a view where ``x`` is contiguous)."""
        assert self.group_size is not None
        return x.reshape(x.shape[0], -1, self.group_size)

    def _mean_abs(self, x: Tensor) -> Tensor:
        if self.group_size is None:
            return super()._mean_abs(x)
        with torch.no_grad():
            return self._groups(x).abs().mean(dim=-1)

    def standardized(self, w: Tensor) -> Tensor:
        """``weight_standardize``: (w - mean) / (std + eps) per slice along dim 0 (a weight's output channels),
        the statistics kept in the graph (not the official code's detached whole-tensor standardisation, which
        the LIQ weight quantizer does). Applied at every bit-width, 32 included."""
        if not self.standardize:
            return w
        dims = list(range(1, w.dim()))
        mean = w.mean(dim=dims, keepdim=True)
        std = w.std(dim=dims, keepdim=True)
        return (w - mean) / (std + _STD_EPS)

    def forward(self, x: Tensor, samples: int = 1) -> Tensor:
        return super().forward(self.standardized(x), samples)

    def extra_repr(self) -> str:
        g = "per-sample" if self.per_sample_grad_scale else "all elements"
        group = "" if self.group_size is None else f", group_size={self.group_size}"
        return f"{super().extra_repr()}{group}, grad_scale={self.grad_scale if self.grad_scale is not None else g}"

    @torch.no_grad()
    def _init_scale(self, stat: Tensor) -> None:
        _, qp = qrange(self.bits, bool(self.signed))
        step = 2.0 * stat.to(self.step) / math.sqrt(qp)  # stat: mean|x|
        # a channel that is all zeros would get step 0: fall back to a tiny positive step
        self.step.copy_(step.clamp_min(1e-6).reshape(self.step.shape))

    def _quantize(self, x: Tensor, samples: int) -> Tensor:
        qn, qp = qrange(self.bits, bool(self.signed))
        g = self.grad_scale
        if g is None:  # N: the elements sharing one step (a group's G where grouped)
            n = x.numel() // max(samples, 1) if self.per_sample_grad_scale else x.numel()
            g = _default_grad_scale(n, self.step.numel(), qp)
        if self.group_size is not None:
            return _apply_lsq(self._groups(x), self.step.unsqueeze(-1).to(x.dtype), qn, qp, g).reshape(x.shape)
        return _apply_lsq(x, self._scale_view(x).to(x.dtype), qn, qp, g)

    def code_range(self) -> tuple[int, int]:
        return qrange(self.bits, bool(self.signed))

    def integer(self, x: Tensor) -> Tensor:
        """The integer codes round(clamp(x/s)) that the forward pass multiplies by s (for export)."""
        qn, qp = self.code_range()
        x = self.standardized(x)
        if self.group_size is not None:
            s = self.step.detach().unsqueeze(-1).clamp_min(STEP_EPS)
            return _codes(self._groups(x), s, qn, qp).reshape(x.shape)
        return _codes(x, self._scale_view(x).detach().clamp_min(STEP_EPS), qn, qp)

    def dequantize(self, codes: Tensor) -> Tensor:
        if self.group_size is not None:
            return (self._groups(codes) * self.step.detach().unsqueeze(-1).clamp_min(STEP_EPS)).reshape(codes.shape)
        return codes * self._scale_view(codes).detach().clamp_min(STEP_EPS)

    def step_size(self) -> Tensor:
        return self.step.detach()

    def affine(self, codes: Tensor) -> list[AffineCodes]:
        """``codes * step``: the codes themselves, the step as the scale."""
        scale = self.step.detach().float().clamp_min(STEP_EPS)
        qn, qp = self.code_range()
        if self.group_size is not None:
            return [AffineCodes(codes, scale, 0, qn, qp, block_size=self.group_size)]
        return [AffineCodes(codes, scale.reshape(()) if self.channel_dim is None else scale, self.channel_dim, qn, qp)]


class _LIQ(Quantizer):
    """What both LIQ quantizers share: one learned clip per tensor, used as ``|c|``.

    The clip starts at 1.0 (LIQ_wn's convolutions), or at ``init_fraction * max|x|`` of the first data
    (0.8 in the official code's Linear layer).
    """

    kind = "liq"
    param_name = "clip"
    clip: nn.Parameter

    def __init__(self, bits: int, signed: Optional[bool], init_fraction: Optional[float]):
        super().__init__(bits, signed)
        self.init_fraction = init_fraction

    def _statistic(self, x: Tensor) -> Tensor:
        return x.abs().max().reshape(1) if x.numel() else x.new_zeros(1)

    @torch.no_grad()
    def _init_scale(self, stat: Tensor) -> None:
        if self.init_fraction is None:
            self.clip.fill_(1.0)
        else:
            self.clip.copy_((self.init_fraction * stat.to(self.clip)).clamp_min(1e-6).reshape(1))

    def extra_repr(self) -> str:
        init = "1.0" if self.init_fraction is None else f"{self.init_fraction}*max|x|"
        return f"{super().extra_repr()}, clip init {init}"

    def _abs_clip(self) -> Tensor:
        return self.clip.abs().clamp_min(STEP_EPS).reshape(())


class _UnitGrid:
    """Weights on the 2^k levels ``(2c/n - 1) * clip`` from -clip to clip (``n = 2^k - 1``, no zero level), the
    codes ``c = round(_unit(w))`` in 0..n; what LIQ_wn and DoReFa share. A subclass gives ``_unit`` (the codes
    before rounding) and ``_grid_clip`` (the clip, in the graph)."""

    bits: int

    def _unit(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def _grid_clip(self) -> Tensor:
        raise NotImplementedError

    def _values(self, codes: Tensor, c: Tensor) -> Tensor:
        """(codes / (2^k - 1) * 2 - 1) * c: one op sequence for the forward pass and :meth:`dequantize`."""
        return (codes / (2**self.bits - 1) * 2.0 - 1.0) * c

    def _quantize(self, x: Tensor, samples: int) -> Tensor:
        return self._values(_RoundSTE.apply(self._unit(x)), self._grid_clip())

    def code_range(self) -> tuple[int, int]:
        return 0, 2**self.bits - 1

    def integer(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.round(self._unit(x))

    def dequantize(self, codes: Tensor) -> Tensor:
        return self._values(codes, self._grid_clip().detach())

    def step_size(self) -> Tensor:
        return (2.0 * self._grid_clip() / (2**self.bits - 1)).detach().reshape(1)

    def affine(self, codes: Tensor) -> list[AffineCodes]:
        return symmetric_grid_forms(codes, self.bits, self._grid_clip().detach().float())


class LIQWeightQuantizer(_UnitGrid, _LIQ):
    """The official SAQ code's weight quantizer (LIQ_wn), for ``bits`` = k.

    ``w_std = (w - mean) / std`` with the whole tensor's mean and (unbiased) std, both detached; then
    ``x = clamp(w_std / c, -1, 1)`` and ``Q = (round((x + 1) / 2 * (2^k - 1)) / (2^k - 1) * 2 - 1) * c``
    with ``c = |clip|`` (starting at 1.0, one standard deviation): 2^k levels from -c to c, no zero level,
    straight-through round; the gradient reaches the clip through the division and the multiplication.
    ``Q`` is in the standardised domain and is what the layer computes with (as the official code's
    convolution). Codes are ``0..2^k-1``. ``standardize=False`` is the official code's Linear layer:
    no standardisation, the clip starting at ``0.8 * max|w|``.
    """

    def __init__(self, bits: int, standardize: bool = True):
        super().__init__(bits, signed=True, init_fraction=None if standardize else 0.8)
        self.standardize = standardize

    def standardized(self, w: Tensor) -> Tensor:
        if not self.standardize:
            return w
        with torch.no_grad():
            mean = w.mean()
            std = w.std() if w.numel() > 1 else torch.ones_like(mean)
        return (w - mean) / std.clamp_min(1e-12)

    def _unit(self, w: Tensor) -> Tensor:
        """(clamp(w_std / c, -1, 1) + 1) / 2 * (2^k - 1): the codes before rounding."""
        x = torch.clamp(self.standardized(w) / self._abs_clip(), -1.0, 1.0)
        return (x + 1.0) / 2.0 * (2**self.bits - 1)

    def _grid_clip(self) -> Tensor:
        return self._abs_clip()


class LIQActQuantizer(_LIQ):
    """The official SAQ code's activation quantizer (LIQ), for ``bits`` = k.

    Unsigned (after ReLU): ``Q = round(clamp(a / c, 0, 1) * (2^k - 1)) / (2^k - 1) * c``, ``c = |clip|``.
    The official code has no signed range (it would clip negatives to 0); here a signed input (decided
    from the data when ``signed=None``, as for LSQ) gets the symmetric range with a zero level,
    ``Q = round(clamp(a / c, -1, 1) * m) / m * c`` with ``m = 2^(k-1) - 1`` (2^k - 1 levels).
    Computed as LSQ's Function with step ``c / levels`` and gradient scale 1, which is the same function
    with the same straight-through gradients (for ``a`` inside the range, and for ``c`` through the
    division and the multiplication), at LSQ's memory cost. The clip starts at 1.0, or at
    ``init_fraction * max|a|`` of the first data (the official Linear layer: 0.8).
    """

    def __init__(self, bits: int, signed: Optional[bool] = None, init_fraction: Optional[float] = None):
        super().__init__(bits, signed, init_fraction)

    def code_range(self) -> tuple[int, int]:
        if self.signed:
            m = 2 ** (self.bits - 1) - 1
            return -m, m
        return 0, 2**self.bits - 1

    def _step(self) -> Tensor:
        return self._abs_clip() / self.code_range()[1]

    def _quantize(self, x: Tensor, samples: int) -> Tensor:
        lo, hi = self.code_range()
        return _LSQFunction.apply(x, self._step().to(x.dtype), lo, hi, 1.0)

    def integer(self, x: Tensor) -> Tensor:
        lo, hi = self.code_range()
        return _codes(x, self._step().detach(), lo, hi)

    def dequantize(self, codes: Tensor) -> Tensor:
        return codes * self._step().detach()

    def step_size(self) -> Tensor:
        return self._step().detach().reshape(1)


def symmetric_grid_forms(codes: Tensor, bits: int, clip: Tensor) -> list[AffineCodes]:
    """The 2^k levels ``(2c/n - 1) * clip`` (``n = 2^k - 1``, codes ``c = 0..n``, no zero level) as affine forms:
    the odd integers ``2c - n`` with scale ``clip / n``; else (8-bit containers cannot hold them at k = 4, 8) the
    codes with zero point ``(n - 1) / 2`` and scale ``2 clip / n``, shifted down half a step."""
    n = 2**bits - 1
    return [AffineCodes(2 * codes - n, (clip / n).reshape(()), None, -n, n),
            AffineCodes(codes, (2 * clip / n).reshape(()), None, 0, n, zero_point=(n - 1) // 2,
                        shift=(-clip / n).reshape(()))]


@dataclass(frozen=True)
class NoOptions:
    """A quantizer kind without options of its own."""


@dataclass(frozen=True)
class LSQOptions:
    """LSQ's options (``QuantConfig`` fields of the same names; ``torchsaq train --per-channel`` ...)."""

    per_channel: bool = field(default=True, metadata={"help": "one weight step per output channel"})
    weight_standardize: bool = field(default=False, metadata={
        "help": "quantize (w-mean)/(std+eps) with per-output-channel statistics kept in the graph (where a "
                "normalisation layer follows)"})
    act_grad_scale: str = field(default="per_sample", metadata={
        "help": "what N counts in the activation step-gradient scale 1/sqrt(N*Qp)"})
    group_size: Optional[int] = field(default=None, metadata={
        "help": "one weight step per group of this many consecutive input elements of each output row (a "
                "convolution's in*kh*kw flattened); the row length must divide by it; unset: per channel"})


@dataclass(frozen=True)
class QuantizerKind:
    """A registered quantizer kind: ``make(w_bits, a_bits, num_channels, options, a_signed=, linear=)`` builds one
    layer's (weight, input-activation) quantizers; ``options``: the dataclass of its options (QuantConfig carries
    them in fields of the same names)."""

    make: Callable[..., tuple[Quantizer, Quantizer]]
    options: type = NoOptions


#: the quantizer kinds (``QuantConfig(quantizer=...)``, ``--quantizer``)
QUANTIZERS: Registry[QuantizerKind] = Registry("quantizer")


def register_quantizer(name: str, *, description: str, options: type = NoOptions) -> Callable[[Any], Any]:
    """Decorator registering ``make(w_bits, a_bits, num_channels, options, a_signed=, linear=)`` as the quantizer
    kind ``name`` with its options dataclass (see :class:`QuantizerKind`)."""
    def add(make: Callable[..., tuple[Quantizer, Quantizer]]) -> Callable[..., tuple[Quantizer, Quantizer]]:
        QUANTIZERS.register(name, QuantizerKind(make, options), description=description)
        return make

    return add


@register_quantizer("lsq", description="LSQ: learned step size", options=LSQOptions)
def _make_lsq(w_bits: int, a_bits: int, num_channels: int, options: LSQOptions, a_signed: Optional[bool] = None,
              linear: bool = False) -> tuple[Quantizer, Quantizer]:
    grouped = options.group_size is not None
    return (LSQQuantizer(w_bits, signed=True, channel_dim=0 if options.per_channel or grouped else None,
                         num_channels=num_channels, standardize=options.weight_standardize,
                         group_size=options.group_size),
            LSQQuantizer(a_bits, signed=a_signed, per_sample_grad_scale=options.act_grad_scale == "per_sample"))


@register_quantizer("liq", description="the official SAQ code's LIQ_wn: learned clip, weights standardised per "
                                       "tensor (detached mean/std)")
def _make_liq(w_bits: int, a_bits: int, num_channels: int, options: NoOptions, a_signed: Optional[bool] = None,
              linear: bool = False) -> tuple[Quantizer, Quantizer]:
    return (LIQWeightQuantizer(w_bits, standardize=not linear),
            LIQActQuantizer(a_bits, signed=a_signed, init_fraction=0.8 if linear else None))


def options_of(kind: str, values: Any) -> Any:
    """The options dataclass of quantizer ``kind`` filled from ``values`` (an object with attributes of the same
    names, such as a QuantConfig; missing ones keep their defaults)."""
    cls = QUANTIZERS.get(kind).options
    return cls(**{f.name: getattr(values, f.name) for f in fields(cls) if hasattr(values, f.name)})


def make_quantizers(kind: str, w_bits: int, a_bits: int, num_channels: int, per_channel: bool = True,
                    a_signed: Optional[bool] = None, per_sample_grad_scale: bool = True,
                    linear: bool = False, options: Any = None) -> tuple[Quantizer, Quantizer]:
    """The (weight, input-activation) quantizers of one layer of the given kind (:data:`QUANTIZERS`), with
    ``options`` (the kind's options dataclass; None: built from ``per_channel`` and ``per_sample_grad_scale``).

    LSQ: signed weight steps (per output channel if ``per_channel``); the activation step's gradient
    scale counts one sample if ``per_sample_grad_scale``. LIQ: one clip per tensor (``per_channel`` and
    the gradient scale do not apply); a convolution gets LIQ_wn (standardised weights, clips from 1.0),
    a ``linear`` layer the official code's QLinear (no standardisation, clips from 0.8 * max|x|).
    """
    entry = QUANTIZERS.get(kind)
    if options is None:
        legacy = type("_Legacy", (), {"per_channel": per_channel,
                                      "act_grad_scale": "per_sample" if per_sample_grad_scale else "batch"})
        options = options_of(kind, legacy)
    return entry.make(w_bits, a_bits, num_channels, options, a_signed=a_signed, linear=linear)
