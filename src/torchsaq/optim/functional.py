"""The maths of the sharpness-aware steps as stateless functions over tensor lists (docs/method.md).

* :func:`sam_perturbation` -- ``e = rho * g / ||g||`` (SAM), or ASAM's ``e = rho * T^2 g / ||T g||`` with
  ``T = |t| + eta``, ``t`` the tensor ``e`` is added to; the norm is the global L2 norm over the whole list.
* :func:`orthogonal_component_` -- LookSAM's ``g_v = g_s - (g_s . g / ||g||^2) g``.
* :func:`add_orthogonal_` -- LookSAM's plain-iteration gradient ``g + alpha * (||g|| / ||g_v||) * g_v``.

Like ``torch.optim``'s functional forms they hold no state and may write into buffers they are told they
own. They never read a device value on the host: scalars they return (norms, scales, finiteness flags) stay
0-dim device tensors, and a non-finite norm is handled on the device (``torch.where``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import _foreach as fe

__all__ = ["EPS", "DEFAULT_RHO", "sam_perturbation", "orthogonal_component_", "add_orthogonal_"]

#: added to the norm in the denominator of the perturbation scale
EPS = 1e-12
#: the perturbation radius rho everywhere one is not given (SAQ, TrainConfig, the sharpness measures, the CLI)
DEFAULT_RHO = 0.05


@torch.no_grad()
def sam_perturbation(grads: Sequence[Tensor], rho: float, *, refs: Optional[Sequence[Tensor]] = None,
                     eta: float = 0.01, owned: Optional[Sequence[bool]] = None,
                     zero_nonfinite: bool = False) -> tuple[list[Tensor], Tensor]:
    """The perturbation ``e`` of every tensor of ``grads`` and whether its norm was finite.

    Without ``refs``: ``e = rho * g / (||g|| + EPS)``. With ``refs`` (ASAM, aligned with ``grads``):
    ``e = rho * T^2 g / (||T g|| + EPS)``, ``T = |refs| + eta``. The norm is taken over all tensors together
    (float32 per tensor, combined on the first tensor's device); the scale ``rho / (norm + EPS)`` is computed
    in float64 and applied in each tensor's dtype.

    ``owned[i]`` says ``grads[i]`` may be overwritten (the result is then built in its buffer); default: none.
    Returns ``(es, ok)`` with ``ok`` a device bool: whether the norm is finite. If not, the scale is 0, but ``e``
    keeps the NaN / inf of the gradient unless ``zero_nonfinite`` (then every ``e`` is exactly zero).
    """
    owned = [False] * len(grads) if owned is None else list(owned)
    if refs is not None:
        t = fe.foreach(torch._foreach_abs, refs)
        fe.foreach(lambda a: torch._foreach_add_(a, eta), t)
        d = fe.mul_owned(grads, owned, t)        # T g
        norm = fe.norm(d)                         # ||T g||
        fe.foreach(torch._foreach_mul_, d, t)     # T^2 g
        del t
        ours = [True] * len(d)
    else:
        d, ours = list(grads), owned
        norm = fe.norm(d)
    ok = torch.isfinite(norm)
    scale = torch.where(ok, rho / (norm.double() + EPS), 0.0)  # float64, as rho / (float(norm) + eps)
    es = fe.mul_owned(d, ours, scale)
    if zero_nonfinite:
        fe.zero_unless(ok, es)
    return es, ok


@torch.no_grad()
def orthogonal_component_(g_sharp: Sequence[Tensor], g: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """In place in ``g``'s buffers: ``g_v = g_s - (g_s . g / ||g||^2) g`` (LookSAM), global over the lists.

    ``g_sharp`` (the gradient at the perturbed point) and ``g`` (at the unperturbed one) are aligned lists.
    Returns device scalars ``(ok, ||g_v||, ||g_v|| / ||g||)``: ``ok`` says whether ``||g||``, the dot product and
    ``||g_v||`` are finite. A zero ``g`` gives ``g_v = g_s`` and ratio 0. The dot product is taken in float64
    from float32 norms by polarisation, ``(||a+b||^2 - ||a-b||^2) / 4``.
    """
    gg = fe.norm(g).double() ** 2
    dot = fe.dot(g_sharp, g)
    c = torch.where(gg > 0, dot / gg, 0.0)
    fe.foreach(lambda a: torch._foreach_mul_(a, fe.on(-c, a[0])), g)
    fe.foreach(torch._foreach_add_, g, g_sharp)
    gvn = fe.norm(g)
    ok = torch.isfinite(gg) & torch.isfinite(dot) & torch.isfinite(gvn)
    ratio = torch.where(gg > 0, gvn.double() / gg.sqrt(), 0.0)
    return ok, gvn, ratio


@torch.no_grad()
def add_orthogonal_(grads: Sequence[Tensor], gvs: Sequence[Optional[Tensor]], gv_norm: Tensor,
                    alpha: Union[float, Tensor]) -> None:
    """In place: ``g <- g + alpha * (||g|| / ||g_v||) * g_v`` (LookSAM's plain iterations).

    ``grads``: every gradient (``||g||`` is their global norm); ``gvs``: aligned, the stored component of each
    (None: nothing to add there). ``gv_norm``: ``||g_v||`` as a device scalar; a zero ``||g_v||`` adds nothing.
    ``alpha``: a number or a device scalar (``alpha="auto"`` of :class:`saq.SAQ` passes the ratio
    ``||g_v|| / ||g_full||`` measured with ``g_v``, which gives ``g + (||g|| / ||g_full||) * g_v``).
    """
    pairs = [(g, v) for g, v in zip(grads, gvs) if v is not None]
    if not pairs:
        return
    gvn = gv_norm.double()
    if torch.is_tensor(alpha):
        alpha = alpha.to(gvn.device)
    coef = torch.where(gvn > 0, alpha * fe.norm(grads).double().to(gvn.device) / gvn, 0.0)
    add = fe.foreach(lambda v: torch._foreach_mul(v, fe.on(coef, v[0])), [v for _, v in pairs])
    fe.foreach(torch._foreach_add_, [g for g, _ in pairs], add)
