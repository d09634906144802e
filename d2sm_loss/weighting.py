"""Choosing the loss's weight: how large is its gradient next to the pixel loss's?

The D2SM value is a KL divergence between similarity distributions, typically about a
hundred times smaller than an L1 loss on the same images, while its gradient on the
restored images can be as large as L1's or larger. The value says nothing about how
hard the term pulls on the network; the gradient on the restored images does, since that
is all the network receives from either loss. :func:`gradient_ratio` measures it:

.. code-block:: python

    restored = model(noisy)
    pixel = F.l1_loss(restored, clean)
    semantic = criterion(restored, clean)
    ratio = gradient_ratio(semantic, pixel, restored)      # |d semantic / d restored| / |d pixel / d restored|
    weight = suggest_weight(semantic, pixel, restored, target=0.1)

Both cost one extra backward pass of each loss down to the restored images (the network
is not touched: nothing accumulates in ``.grad``), so measure once before training, or
every few hundred steps and log it; the ratio drifts as the restorations improve.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .checks import check_number

__all__ = ["gradient_norms", "gradient_ratio", "suggest_weight"]


def gradient_norms(losses: Mapping[str, Tensor], inputs: Tensor) -> dict[str, float]:
    """The L2 norm of each loss's gradient with respect to ``inputs``.

    Args:
        losses: named scalar losses, each computed from ``inputs`` with its graph kept.
        inputs: the tensor whose gradients are compared, normally the restored images
            (a network's output).

    Returns:
        ``{name: |d loss / d inputs|}``. A loss that does not depend on ``inputs`` has
        norm 0. The graphs are retained, so the losses can still be backpropagated.
    """
    if not isinstance(inputs, Tensor) or not inputs.requires_grad:
        raise ValueError("inputs must be a tensor in the autograd graph of the losses (requires_grad=True)")
    norms = {}
    for name, loss in losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"losses[{name!r}] must be a scalar tensor, got {type(loss).__name__}"
                             + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
        if not loss.requires_grad:
            raise ValueError(
                f"losses[{name!r}] has no autograd graph: compute it from inputs with gradients enabled"
            )
        (grad,) = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        norms[name] = 0.0 if grad is None else float(torch.linalg.vector_norm(grad.double()))
    return norms


def gradient_ratio(loss: Tensor, reference: Tensor, inputs: Tensor) -> float:
    """``|d loss / d inputs| / |d reference / d inputs|``: how hard ``loss`` pulls on
    ``inputs`` next to ``reference`` (e.g. the D2SM loss next to L1 on the restored images).

    Multiply by a candidate weight to get the weighted term's pull. Raises ``ValueError``
    when the reference's gradient is zero.
    """
    norms = gradient_norms({"loss": loss, "reference": reference}, inputs)
    if norms["reference"] == 0.0:
        raise ValueError("reference has a zero gradient with respect to inputs: nothing to compare with")
    return norms["loss"] / norms["reference"]


def suggest_weight(loss: Tensor, reference: Tensor, inputs: Tensor, target: float = 0.1) -> float:
    """The weight ``w`` for which ``w * loss`` has a gradient on ``inputs`` of ``target``
    times the reference's: ``w = target / gradient_ratio(loss, reference, inputs)``.

    ``target`` is a positive fraction: 0.1 lets the semantic term steer a tenth as hard as
    the pixel loss. Raises ``ValueError`` when ``loss`` has a zero gradient.
    """
    target = check_number("target", target, positive=True)
    ratio = gradient_ratio(loss, reference, inputs)
    if ratio == 0.0:
        raise ValueError("loss has a zero gradient with respect to inputs: no weight reaches the target")
    return target / ratio
