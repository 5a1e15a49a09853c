"""The names torchsaq's options accept, each defined once, with a one-line description.

The config (:class:`torchsaq.config.TrainConfig`) checks values against these, and the command line builds
its ``choices`` and help text from them, so a new name added here shows up everywhere. Plain tuples and
dicts only: importing this module imports nothing else.

Data sets and models are registries, not fixed lists: ``torchsaq.data.list_datasets()`` and
``torchsaq.models.list_models()``.
"""
from __future__ import annotations

__all__ = ["MODES", "MODE_HELP", "SHARPNESS", "SHARPNESS_HELP", "STRATEGIES", "STRATEGY_HELP", "QUANTIZERS",
           "QUANTIZER_HELP", "ACT_GRAD_SCALES", "ACT_GRAD_SCALE_HELP", "WHERE", "WHERE_HELP", "LSQ_BACKENDS",
           "LSQ_BACKEND_HELP", "OPTIMIZERS",
           "OPTIMIZER_HELP", "SCHEDULES", "SCHEDULE_HELP", "describe"]

#: sharpness-aware modes of :class:`torchsaq.SAQ` (``mode=``); see README "The three cases"
MODE_HELP = {
    "sam": "SAM: perturb the float weights (and steps) along their gradient",
    "case1": "case 1 (mismatch): gradient w.r.t. w through the STE, added after quantizing",
    "case2": "case 2 (diminishment): gradient w.r.t. w through the STE, added before quantizing",
    "case3": "case 3, SAQ: gradient w.r.t. Q(w), added after quantizing",
}
MODES = tuple(MODE_HELP)

#: ``TrainConfig.sharpness`` / ``torchsaq train --sharpness``: a mode, or "none" for plain QAT
SHARPNESS_HELP = {"none": "plain quantization-aware training (no sharpness-aware step)", **MODE_HELP}
SHARPNESS = tuple(SHARPNESS_HELP)

#: how often the sharpness-aware step pays for its ascent pass (``SAQ(strategy=...)``)
STRATEGY_HELP = {
    "full": "two passes every step (the paper)",
    "every_k": "LookSAM: a full step every k iterations, the stored sharp component reused in between",
    "prev_grad": "one pass at the point perturbed by the previous step's gradient",
    "sub_batch": "the ascent pass on a fraction of the batch (m-sharpness), the update pass on all of it: "
                 "1 + fraction passes",
}
STRATEGIES = tuple(STRATEGY_HELP)

#: weight/activation quantizers (``QuantConfig(quantizer=...)``)
QUANTIZER_HELP = {
    "lsq": "LSQ: learned step size",
    "liq": "the official SAQ code's LIQ_wn: learned clip, weights standardised per tensor (detached mean/std)",
}
QUANTIZERS = tuple(QUANTIZER_HELP)

#: what N counts in the LSQ activation step-gradient scale 1/sqrt(N*Qp) (``QuantConfig(act_grad_scale=...)``)
ACT_GRAD_SCALE_HELP = {
    "per_sample": "one sample's elements (the LSQ paper)",
    "batch": "the whole batch's elements (saq 0.1.0)",
}
ACT_GRAD_SCALES = tuple(ACT_GRAD_SCALE_HELP)

#: which weights the sharpness measures and loss landscapes perturb (``torchsaq.analysis``: ``wrt``/``where``)
WHERE_HELP = {
    "quantized": "the quantized weights Q(w)",
    "latent": "the float (latent) weights w, before quantization",
}
WHERE = tuple(WHERE_HELP)

#: implementations of the LSQ fake-quantizer (``torchsaq.kernels.set_lsq_backend``, ``torchsaq train --lsq-backend``)
LSQ_BACKEND_HELP = {
    "autograd": "an autograd Function over torch ops (what torch.compile fuses)",
    "triton": "the custom op torchsaq::lsq: one fused Triton kernel each way, CUDA only",
}
LSQ_BACKENDS = tuple(LSQ_BACKEND_HELP)

#: base optimizers of ``torchsaq train``
OPTIMIZER_HELP = {"sgd": "SGD with momentum", "adamw": "AdamW"}
OPTIMIZERS = tuple(OPTIMIZER_HELP)

#: learning-rate schedules of ``torchsaq train`` (after the warm-up)
SCHEDULE_HELP = {
    "cosine": "cosine decay to 0",
    "step": "multiply by step_gamma at each of step_milestones",
    "constant": "constant",
}
SCHEDULES = tuple(SCHEDULE_HELP)


def describe(help_: dict[str, str]) -> str:
    """``"a: what a is; b: what b is"`` for a help text."""
    return "; ".join(f"{name}: {text}" for name, text in help_.items())
