"""The model registry (timm-style): ``register_model``, ``create_model``, ``list_models``, ``model_info``."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union, overload

from torch import nn

from ...registry import Registry

__all__ = ["ModelInfo", "register_model", "create_model", "list_models", "model_info", "check_model_options"]

Builder = Callable[..., nn.Module]
F = TypeVar("F", bound=Builder)


@dataclass(frozen=True)
class ModelInfo:
    """What a registered model is for: its data family, default per-sample input shape and class count.

    ``family``: "mnist1d", "digits", "fashion_mnist", "cifar", "imagenet" (or "" when unknown); ``dataset``: the
    :mod:`saq.data` data set it is meant for by default; ``input_shape``: (C, ...) of one sample;
    ``source``: "saq", "torchvision" or "timm".
    """

    name: str
    family: str = ""
    dataset: str = ""
    input_shape: Optional[tuple[int, ...]] = None
    num_classes: Optional[int] = None
    source: str = "saq"
    description: str = ""


#: the models: name -> (builder, ModelInfo)
_REGISTRY: Registry[tuple[Builder, ModelInfo]] = Registry("model")


@overload
def register_model(fn: F) -> F: ...


@overload
def register_model(fn: None = None, *, name: Optional[str] = None, family: str = "", dataset: str = "",
                   input_shape: Optional[tuple[int, ...]] = None, num_classes: Optional[int] = None,
                   source: str = "saq", description: str = "") -> Callable[[F], F]: ...


def register_model(fn: Optional[F] = None, *, name: Optional[str] = None, family: str = "", dataset: str = "",
                   input_shape: Optional[tuple[int, ...]] = None, num_classes: Optional[int] = None,
                   source: str = "saq", description: str = "") -> Union[F, Callable[[F], F]]:
    """Register a model builder under ``name`` (default: the function's name); usable bare or with metadata.

    The builder is called as ``fn(num_classes=..., [in_chans=...], [img_size=...], **kwargs)``; ``in_chans``
    and ``img_size`` are passed only when the caller gives them. Registering a taken name is an error.
    """

    def wrap(f: F) -> F:
        key = name or f.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        doc = (inspect.getdoc(f) or "").split("\n")[0]
        info = ModelInfo(key, family, dataset, tuple(input_shape) if input_shape else None, num_classes, source,
                         description or doc)
        _REGISTRY.register(key, (f, info), description=info.description)
        return f

    return wrap(fn) if fn is not None else wrap


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching a glob ``pattern``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown model {name!r}{hint} (saq.models.list_models() lists all {len(_REGISTRY)})")


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model."""
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name][1]


def create_model(name: str, num_classes: int, in_chans: Optional[int] = None, img_size: Optional[int] = None,
                 **kwargs: Any) -> nn.Module:
    """Build the float model ``name`` with a ``num_classes``-way head (random init; quantize it afterwards).

    ``in_chans``/``img_size`` change the input channels / image size where the model supports it;
    other keyword arguments go to the builder (e.g. ``drop_path_rate`` for timm models).
    """
    if name not in _REGISTRY:
        raise _unknown(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for what, v in (("in_chans", in_chans), ("img_size", img_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{what} must be a positive int or None, got {v!r}")
    fn, _ = _REGISTRY[name]
    call = dict(kwargs)
    if in_chans is not None:
        call["in_chans"] = in_chans
    if img_size is not None:
        call["img_size"] = img_size
    check_model_options(name, call)
    try:
        return fn(num_classes=num_classes, **call)
    except (TypeError, ValueError) as e:  # an option value the builder cannot use
        raise ValueError(f"model {name!r} cannot be built with options {call}: {e}") from None


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of a builder's ``default`` (numbers, strings, sequences of them)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and all(
            not default or _fits(v, default[0]) for v in value)
    return True


def check_model_options(name: str, options: dict[str, Any]) -> None:
    """A one-line ValueError for model options the builder of ``name`` does not take, or of another kind than
    its default (``channels: 5`` where the default is a list): checked before anything is built."""
    if name not in _REGISTRY:
        raise _unknown(name)
    fn, _ = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(options) - set(params))
        if bad:
            accepted = [p for p in params if p != "num_classes"]
            raise ValueError(f"model {name!r} does not accept option(s) {', '.join(bad)}; "
                             f"it accepts: {', '.join(accepted) or 'none'}")
    for key, value in options.items():
        default = params[key].default if key in params else inspect.Parameter.empty
        if default not in (inspect.Parameter.empty, None) and not _fits(value, default):
            raise ValueError(f"model {name!r} option {key} must be like its default {default!r}, got {value!r}")
