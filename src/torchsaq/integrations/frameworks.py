"""How the training frameworks call an optimizer, and so which :class:`torchsaq.SAQ` strategies each can run.

Read from their code (docs/method.md, README "Integrations"); each entry says what ``optimizer.step`` receives.
The optimizer's error for a two-pass step called without a closure (:func:`closure_free_hint`) is built here.
"""
from __future__ import annotations

from ..registry import Registry

__all__ = ["FRAMEWORKS", "closure_free_hint"]

#: framework -> how it calls the optimizer (the description) and the strategies that work there (the value)
FRAMEWORKS: Registry[tuple[str, ...]] = Registry("framework")
FRAMEWORKS.register(
    "lightning", ("full", "every_k", "prev_grad", "momentum", "sub_batch"),
    description="automatic optimization passes its closure to optimizer.step(closure) in full and bf16 precision; "
                "with precision='16-mixed' it calls scaler.step(opt) after its own backward (no closure): "
                "prev_grad / momentum only there (the stepping GradScaler is found by integrations.gradscaler)")
FRAMEWORKS.register(
    "accelerate", ("prev_grad", "momentum"),
    description="AcceleratedOptimizer.step() is called after the loop's own backward, without a closure (and "
                "through its GradScaler with fp16); accumulate() calls it at every micro-batch: prev_grad, momentum")
FRAMEWORKS.register(
    "hf_trainer", ("prev_grad", "momentum"),
    description="transformers.Trainer runs loss.backward() then optimizer.step() without a closure (zero_grad "
                "after the step): prev_grad, momentum")


def closure_free_hint() -> str:
    """What to do when a two-pass strategy's step is called without a closure (the frameworks above)."""
    return ("A GradScaler's scaler.step(opt) after the loop's own backward (Lightning with precision='16-mixed' "
            "does this) is such a call: use strategy='prev_grad' there, or bf16 / full precision, where Lightning "
            "passes its closure.")
