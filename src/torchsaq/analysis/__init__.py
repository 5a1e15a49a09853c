"""Sharpness measures and loss landscapes of (quantized) models, "through the quantizer".

Measures (:mod:`.measures`): the dominant Hessian eigenvalue (power iteration on Hessian-vector products), the
Hessian trace (Hutchinson), and SAM / m-sharpness (the worst loss increase in an L2 ball, by projected gradient
ascent); 1-D / 2-D loss landscapes along filter-normalised random directions (Li et al. 2018); :func:`evaluate`.
Files and plots: :mod:`.files`. Checkpoint drivers of the command line: :mod:`.drivers`.

What is differentiated / perturbed (``wrt`` for the measures, ``where`` for the landscape; :data:`WHERE`),
by the rule :class:`saq.perturb.Targets` writes down for the optimizer too:

* ``"quantized"`` (default) -- the quantized weights Q(w) of every :class:`~saq.layers.QuantLayer`. The
  perturbation is added after quantizing, so derivatives are taken w.r.t. Q(w) itself: the quantity SAQ
  (case 3) makes flat.
* ``"latent"`` -- the float weights w, perturbed before quantizing. Derivatives go through the quantizer's
  straight-through estimator (zero where w/s is clipped), and the landscape is the staircase the optimizer of
  the float weights actually walks on.

For the sharpness measures the float parameters that are not quantized (biases, BatchNorm/LayerNorm affine,
weights of layers left in float) are included too (``include_float=True``, as SAQ perturbs them); quantizer
scales (LSQ steps, LIQ clips) never are. Curvature through the activation quantizers is the straight-through
one (rounding is treated as the identity inside the clipping range), which is the curvature the training
gradients see.

All functions run the model in eval mode (BatchNorm running statistics, no dropout), restore each module's
mode and the layers' perturbation state afterwards, and never write to the parameters: perturbed parameters
are passed through :func:`torch.func.functional_call`, so the model is left bit-for-bit unchanged.
``batches`` is a list (or iterable, materialised once) of ``(x, y)`` pairs; losses are averaged over the
batches weighted by their size, so ``criterion`` must return the mean loss of a batch.
"""
from __future__ import annotations

from .drivers import run_landscape, run_sharpness
from .files import format_sharpness_table, load_landscape, plot_landscapes, save_landscape
from .measures import (WHERE, Landscape, evaluate, hessian_top_eigenvalue, hessian_trace, loss_landscape,
                       random_directions, sam_sharpness)

__all__ = [
    "hessian_top_eigenvalue", "hessian_trace", "sam_sharpness", "random_directions", "loss_landscape",
    "Landscape", "save_landscape", "load_landscape", "plot_landscapes", "run_landscape", "run_sharpness",
    "format_sharpness_table", "evaluate", "WHERE",
]
