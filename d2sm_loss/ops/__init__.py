"""Implementations of the similarity-KL statistic (the ops layer).

Every implementation takes restored features ``x`` and clean features ``y`` of shape
``(G, N, D)`` (already validated by :func:`d2sm_loss.functional.similarity_kl`) and
returns the per-row KL divergences, shape ``(G, N)``, with a gradient for ``x`` only.

- :mod:`.reference`: the plain O(N^2)-memory formulation, written to be read; tests
  compare every other path with it.
- :mod:`.streaming`: the same statistic with a custom autograd function that streams
  over row blocks, O(N * block) memory, any device.
- :mod:`.triton_kernels`: fused Triton kernels (forward and backward) for CUDA tensors,
  never materialising an N x N matrix.
- :mod:`.incremental`: the statistic over a batch plus a memory queue from cached
  pairwise similarities of the queue's rows, ``O(B (B + K) D)`` a step instead of
  ``O((B + K)^2 D)`` (used by :class:`~d2sm_loss.FeatureQueue`).

Second derivatives: every implementation supports ``create_graph=True`` and gives the
reference's second derivatives. The streaming and Triton backward passes then evaluate
the reference's gradient differentiably (:func:`.reference.similarity_kl_vjp`), which
costs the reference's O(N^2) memory; an ordinary backward keeps their O(N D) path.
"""

from .reference import COSINE_ETA, NORM_EPS, log_similarity, similarity_kl_reference, similarity_kl_vjp

__all__ = ["COSINE_ETA", "NORM_EPS", "log_similarity", "similarity_kl_reference", "similarity_kl_vjp"]
