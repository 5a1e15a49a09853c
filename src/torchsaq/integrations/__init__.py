"""What torchsaq knows about the frameworks that drive an optimizer, in one place.

* :mod:`.gradscaler`: finding the ``torch.amp.GradScaler`` that steps an optimizer, and its scale (private
  GradScaler attributes, isolated and tested);
* :mod:`.frameworks`: how Lightning, accelerate and the HF Trainer call ``optimizer.step`` (with or without a
  closure, through a GradScaler or not) and which strategies each can run.

Layers below it: torch only. :mod:`torchsaq.optim` uses it.
"""
from __future__ import annotations

from .frameworks import FRAMEWORKS, closure_free_hint
from .gradscaler import has_unscaled, inverse_scale, stepping_scaler

__all__ = ["stepping_scaler", "has_unscaled", "inverse_scale", "FRAMEWORKS", "closure_free_hint"]
