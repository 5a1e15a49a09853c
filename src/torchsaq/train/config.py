"""The training configuration: one dataclass shared by `torchsaq train`, YAML recipes and the Python API."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from .._optional import require
from ..quant.convert import QuantConfig
from .data import dataset_info, default_model
from ..quant.quantizer import check_bits
from ..optim.functional import DEFAULT_RHO
from ..optim.perturb import MODES
from ..optim.strategies import STRATEGIES
from ..quant.convert import A_MODES, ACT_GRAD_SCALES
from ..quant.kernels import LSQ_BACKENDS
from ..quant.quantizer import QUANTIZERS
from ..registry import Registry
from .optimizers import OPTIMIZERS, SCHEDULES

#: ``TrainConfig.sharpness`` / ``torchsaq train --sharpness``: a mode of :data:`MODES`, or "none" for plain QAT
SHARPNESS: Registry[None] = Registry("sharpness")
SHARPNESS.register("none", None, description="plain quantization-aware training (no sharpness-aware step)")
for _mode in MODES:
    SHARPNESS.register(_mode, None, description=MODES.entry(_mode).description)

__all__ = ["TrainConfig", "SharpnessConfig", "load_recipe", "parse_field", "SHARPNESS", "OPTIMIZERS", "SCHEDULES",
           "STRATEGIES", "QUANTIZERS", "ACT_GRAD_SCALES", "LSQ_BACKENDS", "A_MODES"]


@dataclass(frozen=True)
class SharpnessConfig:
    """The sharpness-aware part of a :class:`TrainConfig` in :class:`torchsaq.SAQ`'s terms (``cfg.sharpness_config``).

    ``mode``: a name of :data:`torchsaq.optim.perturb.MODES`, or ``None`` for plain quantization-aware training
    (``sharpness: none``); ``k`` / ``alpha``: the every_k strategy's period and weight (``"auto"``: measured).
    ``rho_start_epochs``: plain steps (rho 0, one pass each with the ``full`` strategy) for this many epochs, then
    sharpness-aware ones. ``rho_warmup_epochs``: rho then rises linearly from 0 over this many epochs.
    ``perturb_unquantized``: also perturb what is not a quantized layer's weight (norm affine, biases, float
    layers), as SAQ does by default.
    ``perturb_exclude``: parameter-name globs never perturbed (e.g. a ViT's ``pos_embed``, ``cls_token``).
    """

    mode: Optional[str] = "case3"
    rho: float = DEFAULT_RHO
    adaptive: bool = False
    strategy: str = "full"
    k: int = 5
    alpha: Union[str, float] = "auto"
    rho_warmup_epochs: float = 0.0
    rho_start_epochs: float = 0.0
    perturb_unquantized: bool = True
    fraction: float = 0.25
    perturb_exclude: tuple[str, ...] = ()

    #: TrainConfig field -> SharpnessConfig field, where the names differ
    FIELDS = {"sharpness": "mode", "rho": "rho", "adaptive": "adaptive", "strategy": "strategy", "strategy_k": "k",
              "strategy_alpha": "alpha", "rho_warmup_epochs": "rho_warmup_epochs",
              "rho_start_epochs": "rho_start_epochs", "perturb_unquantized": "perturb_unquantized",
              "strategy_fraction": "fraction",
              "perturb_exclude": "perturb_exclude"}

    def flat(self) -> dict[str, Any]:
        """The :class:`TrainConfig` fields that say the same (``sharpness``, ``rho``, ..., ``strategy_alpha``)."""
        values = {"sharpness": self.mode or "none", "strategy_alpha": None if self.alpha == "auto" else self.alpha,
                  "perturb_exclude": list(self.perturb_exclude)}
        return {f: values.get(f, getattr(self, name)) for f, name in self.FIELDS.items()}


@dataclass
class TrainConfig:
    """Every knob of a training run. YAML recipes use these field names; CLI flags are --field-name.

    The fields are flat (one flag or recipe key each); :attr:`quant` and :attr:`sharpness_config` group them
    as :class:`torchsaq.QuantConfig` and :class:`SharpnessConfig`, :meth:`saq_kwargs` gives the arguments of
    :class:`torchsaq.SAQ`, and :meth:`from_parts` builds a config from those groups.
    """

    # data and model
    dataset: str = "mnist1d"
    data_dir: Optional[str] = None
    model: Optional[str] = None     # None: the data set's default (torchsaq.data.dataset_info(name).default_model)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: Optional[str] = None
    img_size: Optional[int] = None
    val_split: float = 0.0          # fraction of the training set held out for validation (never the test set)
    workers: int = 0
    train_subset: int = 0           # >0: train on this many examples (a fixed subset, the same for every seed)
    train_subset_seed: int = 0      # which fixed subset train_subset keeps (its own seed, not the run's)
    augment: bool = True            # random training augmentation (CIFAR, ImageNet-style sets, Fashion-MNIST)
    # quantization
    w_bits: int = 4
    a_bits: Optional[int] = 4       # None (``--a-bits none``): weight-only, every layer's inputs stay float
    first_last_bits: int = 8
    quantizer: str = "lsq"          # lsq (learned step) or liq (the official SAQ code's LIQ_wn, learned clip)
    per_channel: bool = True        # LSQ: one weight step per output channel (LIQ: one clip per tensor)
    weight_standardize: bool = False  # LSQ: per-channel (w-mean)/std, statistics in the graph
    layer_bits: dict[str, Any] = field(default_factory=dict)  # module-name glob -> bits or [w_bits, a_bits]
    exclude: list[str] = field(default_factory=list)           # module-name globs left in float
    act_grad_scale: str = "per_sample"  # LSQ activation step gradient: N counts one sample, or the batch
    group_size: Optional[int] = None  # LSQ: one weight step per group of this many inputs of each output row
    embedding_bits: Optional[int] = None  # quantize nn.Embedding tables at these bits (weight-only); None: float
    a_mode: str = "static"          # dynamic_token: int8 per-token dynamic inputs (torchao 8da4w with group_size)
    calib_batches: int = 1
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    accum_steps: int = 1            # micro-batches (of batch_size) accumulated per optimizer step
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_milestones: list[int] = field(default_factory=list)   # for lr_schedule=step (epochs)
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    freeze_bn: bool = False         # BatchNorm normalises with (and keeps) its running statistics while training
    max_grad_norm: Optional[float] = None
    # sharpness-aware minimisation
    sharpness: str = "case3"
    rho: float = DEFAULT_RHO
    adaptive: bool = False
    strategy: str = "full"          # the paper's two-pass step (2x a plain step): the only one that kept SAQ's gain
    #                                 in every benchmark; prev_grad (1x) kept 40-77% of it (docs/strategies.md)
    strategy_k: int = 5             # every_k: a full step every k iterations
    strategy_alpha: Optional[float] = None  # every_k: weight of the stored sharp component; None: auto (measured)
    strategy_fraction: float = 0.25  # sub_batch: the ascent pass's share of the batch
    rho_warmup_epochs: float = 0.0
    rho_start_epochs: float = 0.0   # plain QAT steps (one pass) for this many epochs, then SAQ's
    perturb_unquantized: bool = True  # False: perturb only the quantized layers' weights
    perturb_exclude: list[str] = field(default_factory=list)  # parameter-name globs never perturbed
    # run
    seed: int = 0
    output: str = "runs/saq"
    device: str = "auto"
    threads: int = 0                # CPU threads per process (torch.set_num_threads); 0: auto (see train.py)
    amp: bool = False
    compile: bool = False           # torch.compile the training forward (inductor); evaluation stays eager
    lsq_backend: str = "autograd"   # "triton": the fused custom op (CUDA only; torchsaq.kernels)
    resume: bool = False
    overwrite: bool = False         # a new run in an --output folder that holds one: delete the old run's files
    log_every: int = 0              # 0: once per epoch in the metrics file; the bar updates every step
    eval_every: int = 1             # evaluate val/test every N epochs (and always after the last one)
    save: bool = True               # False: write nothing (no checkpoint, metrics, plots); results still returned
    limit_train_batches: int = 0    # >0: at most this many training batches per epoch (smoke tests)
    limit_eval_batches: int = 0     # >0: at most this many batches per evaluation (smoke tests)

    def __post_init__(self) -> None:
        if self.model is None:
            self.dataset = parse_field("dataset", self.dataset)  # a name before it is looked up
            self.model = default_model(self.dataset)  # an unknown data set fails here, with suggestions
        self.validate()

    def validate(self) -> "TrainConfig":
        """Coerce every field to its declared type (:func:`parse_field`), then check the ranges.

        The one place where options are checked: the CLI flags, YAML recipes, stored checkpoint configs and
        the Python API all end here. Raises a one-line ValueError naming the option.
        """
        def bad(msg: str) -> None:
            raise ValueError(msg)

        for f in dataclasses.fields(self):
            setattr(self, f.name, parse_field(f.name, getattr(self, f.name)))
        dataset_info(self.dataset)  # an unknown data set: a ValueError naming the registered ones
        if not isinstance(self.model, str) or not self.model:
            bad(f"model must be a model name, got {self.model!r}")
        fixed = sorted({"num_classes", "img_size"} & set(self.model_kwargs))
        if fixed:
            bad(f"model_kwargs may not set {', '.join(fixed)}: the data set gives num_classes, and img_size is "
                "its own option")
        chans = self.model_kwargs.get("in_chans", 1)
        if isinstance(chans, bool) or not isinstance(chans, int) or chans < 1:
            bad(f"model_kwargs in_chans must be a positive int, got {chans!r}")
        for b in ("w_bits", "a_bits", "first_last_bits"):
            if getattr(self, b) is not None or b != "a_bits":
                check_bits(getattr(self, b), b.replace("_", "-"))
        if self.sharpness not in SHARPNESS:
            bad(f"unknown sharpness {self.sharpness!r}; choose one of {', '.join(SHARPNESS)}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            bad(f"unknown lr schedule {self.lr_schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.strategy not in STRATEGIES:
            bad(f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.strategy == "momentum" and self.sharpness != "none":
            if self.adaptive:
                bad("strategy momentum (MSAM) has no ASAM form: drop --adaptive, or use strategy prev_grad or full")
            if self.optimizer == "sgd" and self.momentum == 0:
                bad("strategy momentum (MSAM) perturbs along the optimizer's momentum, but momentum is 0: set "
                    "--momentum > 0, or use strategy prev_grad")
        if self.lsq_backend not in LSQ_BACKENDS:
            bad(f"unknown lsq backend {self.lsq_backend!r}; choose one of {', '.join(LSQ_BACKENDS)}")
        if not self.lr > 0:
            bad(f"lr must be > 0, got {self.lr}")
        if self.sharpness != "none" and not self.rho > 0:
            bad(f"rho must be > 0, got {self.rho}")
        if self.epochs < 1:
            bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            bad(f"batch size must be >= 1, got {self.batch_size}")
        if self.accum_steps < 1:
            bad(f"accum_steps must be >= 1 (1: no gradient accumulation), got {self.accum_steps}")
        if self.weight_decay < 0 or self.label_smoothing < 0 or self.label_smoothing >= 1:
            bad("weight decay must be >= 0 and label smoothing in [0, 1)")
        if not 0 <= self.momentum < 1:
            bad(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 < self.step_gamma <= 1:
            bad(f"step_gamma must be in (0, 1] (the LR is multiplied by it at each milestone), got {self.step_gamma}")
        if any(m < 1 for m in self.step_milestones):
            bad(f"step_milestones must be epochs >= 1, got {self.step_milestones}")
        if self.workers < 0 or self.log_every < 0 or self.seed < 0 or self.threads < 0:
            bad("workers, log_every, seed and threads must be >= 0")
        if self.seed >= 2**63 - 1024:  # torch.manual_seed(seed + rank) takes a signed 64-bit integer
            bad(f"seed must be below 2^63 (a 64-bit integer), got {self.seed}")
        if self.img_size is not None and self.img_size < 1:
            bad(f"img_size must be >= 1, got {self.img_size}")
        if not 0 <= self.val_split < 1:
            bad(f"val_split must be in [0, 1), got {self.val_split}")
        if self.eval_every < 1:
            bad(f"eval_every must be >= 1 (evaluate every N epochs), got {self.eval_every}")
        if self.limit_train_batches < 0 or self.limit_eval_batches < 0 or self.calib_batches < 0:
            bad("limit_train_batches, limit_eval_batches and calib_batches must be >= 0")
        if self.warmup_epochs < 0 or self.rho_warmup_epochs < 0 or self.rho_start_epochs < 0:
            bad("warmup_epochs, rho_warmup_epochs and rho_start_epochs must be >= 0")
        if self.sharpness != "none" and self.rho_start_epochs >= self.epochs:
            bad(f"rho_start_epochs ({self.rho_start_epochs}) must be below epochs ({self.epochs}): SAQ would never "
                "start (use --sharpness none for plain QAT)")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            bad(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.train_subset < 0:
            bad(f"train_subset must be >= 0 (0: the whole training set), got {self.train_subset}")
        if self.strategy_alpha is not None and not (math.isfinite(self.strategy_alpha) and self.strategy_alpha >= 0):
            bad(f"strategy_alpha must be a finite number >= 0 (or unset for auto), got {self.strategy_alpha}")
        if self.resume and self.overwrite:
            bad("resume and overwrite exclude each other: --resume continues the run in --output, "
                "--overwrite deletes it")
        if self.strategy_k < 1:
            bad(f"strategy_k must be >= 1, got {self.strategy_k}")
        if not 0 < self.strategy_fraction <= 1:
            bad(f"strategy_fraction must be in (0, 1], got {self.strategy_fraction}")
        self.quant_config()  # the quantizer options (quantizer, act_grad_scale, weight_standardize)
        return self

    def model_options(self, in_chans: int) -> dict[str, Any]:
        """``model_kwargs`` for create_model beside the data's ``in_chans`` (an ``in_chans`` in them must match it)."""
        options = dict(self.model_kwargs)
        chans = options.pop("in_chans", in_chans)
        if chans != in_chans:
            raise ValueError(f"model_kwargs in_chans={chans} does not match the {self.dataset} inputs "
                             f"({in_chans} channel(s)); drop it, the data set gives it")
        return options

    #: the fields that :attr:`quant` reads (QuantConfig's own names)
    QUANT_FIELDS = ("w_bits", "a_bits", "first_last_bits", "per_channel", "weight_standardize", "quantizer",
                    "act_grad_scale", "layer_bits", "exclude", "group_size", "embedding_bits", "a_mode")

    def quant_config(self) -> QuantConfig:
        """The :class:`saq.QuantConfig` these options describe."""
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, first_last_bits=self.first_last_bits,
                           per_channel=self.per_channel, weight_standardize=self.weight_standardize,
                           quantizer=self.quantizer, act_grad_scale=self.act_grad_scale,
                           layer_bits=dict(self.layer_bits), exclude=tuple(self.exclude),
                           group_size=self.group_size, embedding_bits=self.embedding_bits, a_mode=self.a_mode)

    @property
    def model_name(self) -> str:
        """``model``, which ``__post_init__`` set to the data set's default model if it was given as None."""
        if self.model is None:
            raise ValueError("TrainConfig.model was set to None after the config was built; name a model")
        return self.model

    @property
    def quant(self) -> QuantConfig:
        """:meth:`quant_config`: a new :class:`QuantConfig` built from the fields (changing it changes nothing here)."""
        return self.quant_config()

    @property
    def sharpness_config(self) -> SharpnessConfig:
        """The sharpness-aware fields as a :class:`SharpnessConfig` (``mode`` None for ``sharpness: none``)."""
        return SharpnessConfig(mode=None if self.sharpness == "none" else self.sharpness, rho=self.rho,
                               adaptive=self.adaptive, strategy=self.strategy, k=self.strategy_k,
                               alpha="auto" if self.strategy_alpha is None else self.strategy_alpha,
                               rho_warmup_epochs=self.rho_warmup_epochs, rho_start_epochs=self.rho_start_epochs,
                               perturb_unquantized=self.perturb_unquantized, fraction=self.strategy_fraction,
                               perturb_exclude=tuple(self.perturb_exclude))

    def saq_kwargs(self, steps_per_epoch: int) -> dict[str, Any]:
        """Keyword arguments of ``torchsaq.SAQ(model, base, **kwargs)`` for this run (``grad_scaler`` aside).

        ``rho_schedule`` is :func:`torchsaq.rho_warmup` over ``rho_warmup_epochs * steps_per_epoch`` steps after
        ``rho_start_epochs * steps_per_epoch`` plain ones (``None`` without either); ``steps_per_epoch`` counts
        optimizer steps (with ``accum_steps`` > 1, ``ceil(batches / accum_steps)``). A ValueError for
        ``sharpness: none`` (that run has no SAQ optimizer).
        """
        s = self.sharpness_config
        if s.mode is None:
            raise ValueError("sharpness 'none' trains with the base optimizer alone: there are no SAQ arguments")
        from ..optim.saq import rho_warmup

        warm = int(round(s.rho_warmup_epochs * steps_per_epoch))
        start = int(round(s.rho_start_epochs * steps_per_epoch))
        return dict(rho=s.rho, mode=s.mode, adaptive=s.adaptive, strategy=s.strategy, k=s.k, alpha=s.alpha,
                    rho_schedule=rho_warmup(s.rho, warm, start) if warm > 0 or start > 0 else None,
                    max_grad_norm=self.max_grad_norm,
                    perturb_unquantized=s.perturb_unquantized, fraction=s.fraction,
                    perturb_exclude=s.perturb_exclude)

    @classmethod
    def from_parts(cls, quant: Optional[QuantConfig] = None, sharpness: Optional[SharpnessConfig] = None,
                   **fields: Any) -> "TrainConfig":
        """A config from a :class:`QuantConfig` and/or a :class:`SharpnessConfig` plus other fields, e.g.
        ``TrainConfig.from_parts(QuantConfig(w_bits=2, a_bits=2), SharpnessConfig(mode="sam"), epochs=5)``.

        A field given both ways is an error; so is a QuantConfig option that has no TrainConfig field (``a_signed``).
        """
        parts: dict[str, Any] = {}
        if quant is not None:
            q = quant.to_dict()
            if q.pop("a_signed") is not None:
                raise ValueError("QuantConfig.a_signed has no TrainConfig field (the signed range is decided per "
                                 "layer from the data); leave it None")
            parts.update(q)
        if sharpness is not None:
            parts.update(sharpness.flat())
        both = sorted(set(parts) & set(fields))
        if both:
            raise ValueError(f"{', '.join(both)} given both in a part and as a field")
        return cls.from_dict({**parts, **fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
        return cls(**d)


_TRUE = ("true", "yes", "on", "y", "1")
_FALSE = ("false", "no", "off", "n", "0")
_HINTS: dict[str, Any] = {}


def _field_type(name: str) -> tuple[Any, bool]:
    """(declared type without Optional, whether None is allowed) of a TrainConfig field."""
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    tp = _HINTS[name]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is Union and type(None) in args:
        (tp,) = [a for a in args if a is not type(None)]
        return tp, True
    return tp, False


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _as_float(name: str, value: Any) -> float:
    out: Optional[float] = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out = float(value)
    elif isinstance(value, str):  # YAML 1.1 reads 1e-2 and 5e-4 (no dot) as strings
        try:
            out = float(value.strip())
        except ValueError:
            pass
    if out is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(out):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return out


def parse_field(name: str, value: Any) -> Any:
    """``value`` as the declared type of TrainConfig field ``name``, or a one-line ValueError.

    Booleans accept true/false/yes/no/on/off/1/0 (any case) as strings; integers accept integral numbers
    and digit strings (not 1.5); floats accept numbers and numeric strings (``1e-2``) and must be finite;
    lists of integers must be lists. Shared by the CLI flags, YAML recipes and the Python API.
    """
    tp, optional = _field_type(name)
    if optional and tp in (int, float) and isinstance(value, str) and value.strip().lower() in ("none", "null"):
        value = None  # an optional number's flag: --a-bits none
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must not be null")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        return _as_int(name, value)
    if tp is float:
        return _as_float(name, value)
    if tp is str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            example = "[fc, 'blocks.0.*']" if item is str else "[30, 60]"
            raise ValueError(f"{name} must be a list, e.g. {example}, got {value!r}")
        check_size(value, name)
        if item is str:
            wrong = [v for v in value if not isinstance(v, str)]
            if wrong:
                raise ValueError(f"{name} items must be strings (module-name globs such as 'fc' or 'blocks.0.*'), "
                                 f"got {wrong[0]!r}")
        return [_as_int(f"{name} item", v) if item is int else v for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, e.g. {{key: value}}, got {value!r}")
        check_size(value, name)
        if name == "model_kwargs":
            keys = [k for k in value if not isinstance(k, str)]
            if keys:
                raise ValueError(f"model_kwargs keys must be option names (strings), got {keys[0]!r}")
        return dict(value)
    return value  # pragma: no cover - every field type is handled above


#: the most values (containers and scalars, YAML aliases expanded) one option or recipe may hold
MAX_VALUES = 100_000


def check_size(value: Any, what: str, limit: int = MAX_VALUES) -> None:
    """A ValueError if ``value`` (YAML/JSON data) refers to itself or holds more than ``limit`` values once its
    shared parts (YAML aliases) are expanded: counted without expanding them, so a billion-laughs recipe fails
    at once instead of being copied until memory runs out."""
    sizes: dict[int, int] = {}
    path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list, tuple)):
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else list(node)
        if done:
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            path.discard(key)
            if sizes[key] > limit:
                raise ValueError(f"{what} is too large: over {limit} values once its YAML aliases are expanded")
        elif key in path:
            raise ValueError(f"{what} refers to itself (a recursive YAML alias such as '&x {{k: *x}}')")
        elif key not in sizes:
            path.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in children)


def load_recipe(path: Union[str, Path], **overrides: Any) -> TrainConfig:
    """Read a YAML recipe (keys = TrainConfig fields) and apply overrides (None values are ignored)."""
    yaml = require("yaml", "cli", "reading a YAML recipe")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"recipe {path} is a folder; give a YAML file (a run's own is {path / 'config.yaml'})")
    if not path.is_file():
        raise ValueError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ValueError(f"recipe {path} is not valid YAML: {problem}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read recipe {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping of option: value")
    check_size(data, f"recipe {path}")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data)


def bits_label(w_bits: Any, a_bits: Any) -> str:
    """``w4a4``, or ``w4 (weight-only)`` when activations stay float (``a_bits`` None)."""
    return f"w{w_bits} (weight-only)" if a_bits is None else f"w{w_bits}a{a_bits}"
