"""Model conversion: :class:`QuantConfig`, :func:`quantize` (torchao-style, in place) and :func:`calibrate`."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Union, cast

import torch
from torch import nn

from .layers import QUANT_CLASSES, QuantLayer, float_class, macs_per_sample, quant_layers
from .quantizer import FLOAT_BITS, QUANTIZERS, LIQActQuantizer, Quantizer, check_bits, options_of
from ..registry import Registry

__all__ = ["QuantConfig", "quantize", "calibrate", "is_traced", "ensure_traced", "eval_mode", "ACT_GRAD_SCALES",
           "A_MODES"]

Bits = Union[int, tuple[int, int], list]

#: what N counts in the LSQ activation step-gradient scale 1/sqrt(N*Qp) (``QuantConfig(act_grad_scale=...)``)
ACT_GRAD_SCALES: Registry[None] = Registry("act_grad_scale")
ACT_GRAD_SCALES.register("per_sample", None, description="one sample's elements (the LSQ paper)")
ACT_GRAD_SCALES.register("batch", None, description="the whole batch's elements (saq 0.1.0)")

#: how the layers' inputs are quantized (``QuantConfig(a_mode=...)``, ``--a-mode``)
A_MODES: Registry[None] = Registry("a_mode")
A_MODES.register("static", None, description="the quantizer kind's learned step / clip, initialised from data")
A_MODES.register("dynamic_token", None,
                 description="int8 asymmetric per token (row), scale and zero point from each input, nothing learned "
                             "(torchao 8da4w; Linear layers only, a_bits=8)")


@dataclass
class QuantConfig:
    """How to quantize a model.

    ``w_bits``/``a_bits``: 2..8, or 32 for not quantized. ``first_last_bits``: bits (weights and input
    activations) of the first and the last quantized layer in execution order (8, or 32 to keep them
    float). ``quantizer``: ``"lsq"`` (learned step) or ``"liq"`` (the official SAQ code's quantizer: learned
    clips; convolutions as its LIQ_wn, weights standardised with the whole tensor's detached mean and std,
    clips from 1.0; Linear layers as its QLinear, no standardisation, clips from 0.8 * max|x|; see
    :class:`saq.quantizer.LIQWeightQuantizer`). ``per_channel``: one LSQ weight step per output channel
    (LIQ has one clip per tensor). ``weight_standardize`` (LSQ only): quantize ``(w-mean)/(std+eps)`` with
    per-output-channel statistics kept in the graph (use only where a normalisation layer follows); this is
    not the official code's per-tensor detached standardisation, which ``quantizer="liq"`` does by itself.
    ``act_grad_scale``: N of LSQ's activation step-gradient scale ``1/sqrt(N*Qp)`` counts the elements of
    one sample (``"per_sample"``, the LSQ paper) or of the whole batch (``"batch"``). ``a_signed``: signed
    activation range; ``None`` decides per layer from the data. ``layer_bits``: glob pattern on module
    names -> bits (int for both, or ``(w_bits, a_bits)``); wins over everything else. ``exclude``: glob
    patterns of layers left as float modules. ``a_bits=None``: weight-only, every layer's input stays float (the
    first and last layers' too: they get ``first_last_bits`` weights and float inputs). ``group_size`` (LSQ):
    one weight step per group of that many consecutive input elements of each output row (a convolution's
    ``in*kh*kw`` flattened), the step-gradient scale counting the group's elements; a layer whose row length
    it does not divide is refused by name (exclude it); unset: per channel (or per tensor).
    ``embedding_bits``: also quantize every ``nn.Embedding``'s table at these bits (weight-only; LSQ: a step per
    row, or per ``group_size`` group of a row); embeddings take no first/last role. None: embeddings stay float.
    A weight tied between two modules (an embedding and an LM head) is quantized by each quantized module with its
    own steps; an export refuses such a model (untie the weights, or keep both float).
    ``a_mode``: ``"static"`` (the quantizer kind's learned activation steps) or ``"dynamic_token"``: torchao's 8da4w
    activations, every Linear input quantized to int8 per token (row) with a scale and zero point computed from it
    on the fly (:mod:`torchsaq.quant.dynamic`); LSQ only, ``a_bits=8``, first/last and ``layer_bits`` activations 8 or
    32; a convolution is refused by name (exclude it). With ``group_size`` it is the 8da4w scheme.
    """

    w_bits: int = 4
    a_bits: Optional[int] = 4
    first_last_bits: int = 8
    per_channel: bool = True
    weight_standardize: bool = False
    a_signed: Optional[bool] = None
    layer_bits: dict[str, Bits] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    quantizer: str = "lsq"
    act_grad_scale: str = "per_sample"
    group_size: Optional[int] = None
    embedding_bits: Optional[int] = None
    a_mode: str = "static"

    def __post_init__(self) -> None:
        check_bits(self.w_bits, "w_bits")
        if self.embedding_bits is not None:
            check_bits(self.embedding_bits, "embedding_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.group_size is not None:
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
            if self.quantizer != "lsq":
                raise ValueError(f"group_size is an LSQ option; quantizer={self.quantizer!r} has none")
            if not self.per_channel:
                raise ValueError("group_size gives steps per group of each output channel: it needs "
                                 "per_channel=True")
        check_bits(self.first_last_bits, "first_last_bits")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"unknown quantizer {self.quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
        if self.act_grad_scale not in ACT_GRAD_SCALES:
            raise ValueError(f"unknown act_grad_scale {self.act_grad_scale!r}; choose one of "
                             f"{', '.join(ACT_GRAD_SCALES)}")
        if self.quantizer != "lsq" and self.weight_standardize:
            raise ValueError("weight_standardize is an LSQ option (per-channel statistics in the graph); "
                             "quantizer='liq' already standardises each weight tensor (detached statistics)")
        if not isinstance(self.layer_bits, dict):
            raise ValueError(f"layer_bits must be a dict of pattern -> bits, got {type(self.layer_bits).__name__}")
        self.layer_bits = {str(k): _pair(v, f"layer_bits[{k!r}]") for k, v in self.layer_bits.items()}
        self._check_a_mode()
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.exclude = tuple(self.exclude)

    def _check_a_mode(self) -> None:
        """``a_mode="dynamic_token"`` (int8 per token) with the bits and the quantizer it fits, or a ValueError."""
        if self.a_mode not in A_MODES:
            raise ValueError(f"unknown a_mode {self.a_mode!r}; choose one of {', '.join(A_MODES)}")
        if self.a_mode == "static":
            return
        if self.a_bits != 8:
            raise ValueError(f"a_mode='dynamic_token' quantizes activations to int8 per token: it needs a_bits=8, got "
                             f"{'None (weight-only)' if self.a_bits is None else self.a_bits}")
        if self.quantizer != "lsq":
            raise ValueError(f"a_mode='dynamic_token' pairs with LSQ weights (quantizer='lsq'), got {self.quantizer!r}")
        if self.first_last_bits not in (8, FLOAT_BITS):
            raise ValueError(f"a_mode='dynamic_token': first_last_bits must be 8 or 32 (int8 or float inputs), got "
                             f"{self.first_last_bits}")
        bad = [k for k, (_, a) in self.bits_pairs().items() if a not in (8, FLOAT_BITS)]
        if bad:
            raise ValueError(f"a_mode='dynamic_token': layer_bits[{bad[0]!r}] gives activations "
                             f"{self.bits_pairs()[bad[0]][1]} bits; they must be 8 or 32")

    def quantizer_options(self) -> Any:
        """The options dataclass of :attr:`quantizer` (:data:`torchsaq.quant.quantizer.QUANTIZERS`), from the fields
        of the same names (``per_channel``, ``weight_standardize``, ``act_grad_scale``, ``group_size`` for LSQ)."""
        return options_of(self.quantizer, self)

    @property
    def act_bits(self) -> int:
        """The input-activation bits of the layers: ``a_bits``, 32 (float) where weight-only (``a_bits=None``)."""
        return FLOAT_BITS if self.a_bits is None else self.a_bits

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_bits"] = {k: list(v) for k, v in self.bits_pairs().items()}
        d["exclude"] = list(self.exclude)
        for key in ("group_size", "embedding_bits"):  # unset: left out, so files without them stay as they were
            if d[key] is None:
                del d[key]
        if d["a_mode"] == "static":  # (likewise)
            del d["a_mode"]
        return d

    def bits_pairs(self) -> dict[str, tuple[int, int]]:
        """``layer_bits`` as __post_init__ leaves it: pattern -> (w_bits, a_bits)."""
        return cast("dict[str, tuple[int, int]]", self.layer_bits)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s): {sorted(unknown)}")
        return cls(**d)


def _pair(v: Bits, what: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{what} must be an int or a (w_bits, a_bits) pair, got {v!r}")
        return check_bits(v[0], what), check_bits(v[1], what)
    b = check_bits(v, what)
    return b, b


def _override(name: str, config: QuantConfig) -> Optional[tuple[int, int]]:
    for pattern, bits in config.bits_pairs().items():
        if fnmatch.fnmatchcase(name, pattern):
            return bits
    return None


def quantize(model: nn.Module, config: Optional[QuantConfig] = None,
             example_inputs: Optional[Any] = None) -> nn.Module:
    """Convert every ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` of ``model`` in place to its quantized twin.

    Parameters keep their names (a float ``state_dict`` still loads). The first and last quantized layers
    are found in execution order on the first forward pass (or now, from ``example_inputs``: a tensor or a
    tuple of positional inputs) and get ``config.first_last_bits``. Step sizes are initialised from the
    first training batch, or by :func:`calibrate`. Returns ``model``.

    ``nn.Embedding`` tables are converted too where ``config.embedding_bits`` is set. Hugging Face's ``Conv1D``
    (GPT-2's attention and MLP projections: a Linear with its weight stored ``[in, out]``) becomes an
    ``nn.Linear`` first, the same function: its weight Parameter keeps its identity (optimizers, tied references)
    and gets the ``[out, in]`` layout, so its steps are per output channel / per group of inputs like any
    Linear's. A ``state_dict`` saved afterwards holds those weights transposed (load it into a model quantized
    the same way, not into a fresh GPT-2).
    """
    config = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize expects an nn.Module, got {type(model).__name__}")
    if quant_layers(model):
        raise ValueError("model is already quantized")
    undo = _hf_conv1d_to_linear(model, config.exclude)
    try:
        return _quantize(model, config, example_inputs)
    except BaseException:
        for m, cls in undo:
            _transpose_weight(m)
            m.__class__ = cls
        raise


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``transformers.pytorch_utils.Conv1D`` (recognised without importing transformers)."""
    cls = type(m)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") and hasattr(m, "nf")


def _hf_conv1d_to_linear(model: nn.Module, exclude: tuple[str, ...]) -> list[tuple[nn.Module, type]]:
    """Turn every HF ``Conv1D`` not excluded into an ``nn.Linear`` in place (the weight transposed in its own
    Parameter); returns (module, its class) to undo it."""
    done: list[tuple[nn.Module, type]] = []
    for name, m in model.named_modules():
        if not _is_hf_conv1d(m) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        done.append((m, type(m)))
        _transpose_weight(m)
        m.__class__ = nn.Linear
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    return done


def _transpose_weight(m: nn.Module) -> None:
    """``m.weight`` transposed in its own Parameter (2-D)."""
    w = cast(nn.Parameter, m.weight)
    w.data = w.data.t().contiguous()


def _quantize(model: nn.Module, config: QuantConfig, example_inputs: Optional[Any]) -> nn.Module:
    targets = []
    for name, m in model.named_modules():
        if type(m) is nn.Embedding and config.embedding_bits is None:
            continue
        if type(m) in QUANT_CLASSES and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude):
            if isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
                raise ValueError(f"quantize: embedding {name} has max_norm or sparse=True, which a quantized table "
                                 "cannot keep; exclude it")
            targets.append((name, m))
    if not targets:
        raise ValueError("model has no nn.Conv1d, nn.Conv2d or nn.Linear layer to quantize")
    names = [n for n, _ in targets]
    all_names = [n for n, _ in model.named_modules()]
    for pattern in config.layer_bits:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"layer_bits pattern {pattern!r} matches no quantizable layer "
                             f"(e.g. {', '.join(names[:3])}, ...)")
    for pattern in config.exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
            raise ValueError(f"exclude pattern {pattern!r} matches no module of the model")

    # all or nothing: on any failure (a layer that cannot be converted, example inputs of the wrong shape) every
    # converted layer and the model get their earlier class and attributes back
    saved = [(m, type(m), {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in m.__dict__.items()})
             for _, m in targets]
    try:
        for name, m in targets:
            bits = _override(name, config) or (config.w_bits, config.act_bits)
            if isinstance(m, nn.Embedding):  # indices are never quantized
                bits = (bits[0] if _override(name, config) else cast(int, config.embedding_bits), FLOAT_BITS)
            m.__class__ = QUANT_CLASSES[type(m)]
            m._saq_name = name
            m._init_quant(bits[0], bits[1], config.quantizer, config.quantizer_options(), config.a_signed,
                          config.a_mode)
        # nn.Module.__setattr__'s stub admits Tensor/Module values only; any value is stored at run time
        model._saq_config = config  # type: ignore[assignment]
        hook = model.register_forward_pre_hook(_trace_pre_hook, with_kwargs=True)
        model._saq_trace_hook = hook  # type: ignore[assignment]
        if example_inputs is not None:
            args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
            trace(model, *args)
    except BaseException:
        _drop_trace_hook(model)
        model.__dict__.pop("_saq_trace_hook", None)
        model.__dict__.pop("_saq_config", None)
        for m, cls, attrs in saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attrs)
        raise
    return model


def is_traced(model: nn.Module) -> bool:
    return getattr(model, "_saq_trace_hook", None) is None


def _trace_pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    trace(model, *args, **kwargs)
    return None


def _drop_trace_hook(model: nn.Module) -> bool:
    """Remove the first-forward trace hook (the model counts as traced from now on); False if there was none."""
    hook = getattr(model, "_saq_trace_hook", None)
    if hook is None:
        return False
    hook.remove()
    model._saq_trace_hook = None  # type: ignore[assignment]  # (Module.__setattr__'s stub: Tensor/Module only)
    return True


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and give every module back its own training flag afterwards."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def _float_pass(model: nn.Module, *args: Any, **kwargs: Any) -> list[QuantLayer]:
    """One float forward in eval mode that records each quantized layer's MACs per sample; returns the order.

    Consumes no randomness and restores every module's mode; shared by :func:`trace` and ``saq.summary``.
    """
    layers = [m for _, m in quant_layers(model)]
    order: list[QuantLayer] = []

    def record(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        layer = cast(QuantLayer, m)  # a quantized layer, running its float class's forward (see below)
        if layer not in order:
            order.append(layer)
        layer._saq_macs = (layer._saq_macs or 0) + macs_per_sample(layer, args[0] if args else kwargs["input"], out)

    swapped: list = []  # (layer, its class, hook handle)
    try:
        for m in layers:
            m._saq_macs = 0  # each call adds its MACs per sample
            swapped.append((m, type(m), m.register_forward_hook(record, with_kwargs=True)))
            m.__class__ = float_class(m)  # the float forward: no quantizer (steps not initialised yet)
        with eval_mode(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    finally:
        for m, cls, handle in swapped:
            m.__class__ = cls
            handle.remove()
    return order


@torch.no_grad()
def trace(model: nn.Module, *args: Any, **kwargs: Any) -> list[QuantLayer]:
    """Run one float forward pass to find the quantized layers' execution order; set first/last bits.

    Runs in eval mode under ``no_grad`` (no BatchNorm statistics change, no randomness consumed beyond the
    forward itself) and restores every module's mode afterwards.
    """
    if not _drop_trace_hook(model):
        return []
    try:
        order = _float_pass(model, *args, **kwargs)
    except BaseException:
        for _, m in quant_layers(model):
            m._saq_macs = None
        model._saq_trace_hook = model.register_forward_pre_hook(  # type: ignore[assignment]  # (as in quantize)
            _trace_pre_hook, with_kwargs=True)
        raise
    if not order:
        raise ValueError("the forward pass used none of the quantized layers")
    config = cast(QuantConfig, model._saq_config)  # set by quantize
    order = [m for m in order if not isinstance(m, nn.Embedding)]  # a lookup takes no first/last role
    if not order:
        return order
    roles = {order[0]: "first", order[-1]: "last"} if len(order) > 1 else {order[0]: "first"}
    for m, role in roles.items():
        m.quant_role = role
        aq = m.act_quantizer
        if role == "first" and isinstance(aq, LIQActQuantizer) and aq.init_fraction is None and not aq.is_initialized:
            # LIQ's fixed clip of 1.0 would cut the raw network input (normalised data reaches 2-4); the
            # first layer's input clip starts at max|x| instead, so its 8 bits cover the data as LSQ's do
            aq.init_fraction = 1.0
        if _override(m._saq_name, config) is None:
            m.set_bits(config.first_last_bits, FLOAT_BITS if config.a_bits is None else config.first_last_bits)
    return order


def ensure_traced(model: nn.Module) -> None:
    if not is_traced(model):
        raise RuntimeError("the model's first/last layers are not known yet: run one forward pass or "
                           "saq.calibrate(model, batches) first")


def _inputs(batch: Any) -> tuple:
    if torch.is_tensor(batch):
        return (batch,)
    if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]):
        return (batch[0],)
    if isinstance(batch, dict):
        for key in ("input", "inputs", "x", "image", "images", "pixel_values", "input_ids"):
            if key in batch:
                return (batch[key],)
    raise ValueError("calibrate expects batches that are tensors, (input, target) pairs or dicts with an "
                     f"'input'/'x'/'image' key; got {type(batch).__name__}")


@torch.no_grad()
def _warn_all_zero(model: nn.Module) -> None:
    """Warn when a layer's calibration inputs were all zero: its activation step falls back to the tiny 1e-6 and
    every input then gives (nearly) the same output."""
    dead = [n for n, m in model.named_modules() if isinstance(m, QuantLayer) and m.act_quantizer.enabled
            and m.act_quantizer.is_initialized and float(m.act_quantizer.step_size().max()) <= 1e-6]
    if dead:
        warnings.warn(f"calibrate: the inputs of {len(dead)} layer(s) were all zero (e.g. {', '.join(dead[:3])}): "
                      "their activation steps fall back to 1e-6 and every input gives the same output; calibrate "
                      "on real data", UserWarning, stacklevel=3)


def calibrate(model: nn.Module, batches: Iterable[Any], num_batches: Optional[int] = None,
              device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Initialise every quantizer from data: LSQ's step 2*mean|x|/sqrt(Qp) (mean|x| averaged over the
    batches); LIQ's clips start at 1.0 in convolutions whatever the data, at 0.8 * max|x| (averaged over the
    batches) in Linear layers. Undecided activation signedness comes from the data.

    Runs in eval mode (BatchNorm statistics untouched) with quantization off, so each layer sees float
    inputs. A BatchNorm whose running statistics were never updated (a model trained from scratch)
    normalises with batch statistics instead, as it will in training; its buffers are restored afterwards.
    Re-initialises quantizers that were already initialised. Batches that give a non-finite scale (NaN/inf
    in the data) are a ValueError, and the quantizers are left as they were. Returns ``model``.
    """
    if not quant_layers(model):
        raise ValueError("calibrate: the model has no quantized layer (call saq.quantize first)")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    quantizers: list[Quantizer] = []  # collected after the trace, which may change first/last bits
    fresh_bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.track_running_stats and m.num_batches_tracked is not None and int(m.num_batches_tracked) == 0]
    bn_buffers = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False)}) for m in fresh_bn]
    seen = 0
    with eval_mode(model):
        for m in fresh_bn:
            m.train()
        try:
            for i, batch in enumerate(batches):
                if num_batches is not None and i >= num_batches:
                    break
                args = tuple(a.to(device) for a in _inputs(batch))
                if any(a.dim() and a.shape[0] == 0 for a in args if torch.is_tensor(a)):
                    raise ValueError(f"calibrate: batch {i} is empty (0 samples); give batches with samples")
                if i == 0:
                    trace(model, *args)
                    quantizers = [q for q in model.modules() if isinstance(q, Quantizer) and q.enabled]
                    before = [{k: v.clone() for k, v in q.state_dict().items()} for q in quantizers]
                    for q in quantizers:
                        q.start_calibration()
                model(*args)
                seen += 1
            if seen == 0:
                raise ValueError("calibrate: no batch was given")
            for q in quantizers:
                q.finish_calibration()
            names = {id(m): n for n, m in model.named_modules()}
            bad = [names[id(q)] for q in quantizers if not bool(torch.isfinite(q.scale).all())]
            if bad:
                for q, sd in zip(quantizers, before):
                    q.load_state_dict(sd)
                raise ValueError(f"calibrate: the batches give non-finite step sizes / clips for {len(bad)} "
                                 "quantizer(s) "
                                 f"(e.g. {', '.join(bad[:3])}): the data holds NaN or inf values; left unchanged")
            _warn_all_zero(model)
        finally:
            for q in quantizers:
                q._calib = None
            for m, buffers in bn_buffers:
                for k, b in buffers.items():
                    getattr(m, k).copy_(b)
    return model
