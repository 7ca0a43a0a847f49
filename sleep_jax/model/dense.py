"""Dense products over activations as one 2-D matmul: how the model multiplies by a weight
(products batched over an expert or slot axis stay einsums).

``x (..., K1..Kc) @ w (K1..Kc, N...)`` is computed as ``(rows, K) @ (K, N)`` on flattened views
and reshaped back. The value is the same product; what differs is its gradient w.r.t. ``w``.
Differentiated, a product whose activation has batch *and* length axes contracts two axes
(``sum_{b,t} x[b,t,:] g[b,t,:]``), and XLA's CPU dot takes such a product as a transposed copy
of the activation's gradient, written element by element in the other order: on SmolLM2 the
logits' gradient (2048 x 49152) for the tied embedding and both SwiGLU gradients of every layer,
about a fifth of a train step (bench ``train_step`` op trace). Flattened first, the same
gradient is one product contracting the leading axis of both operands, which the CPU dot reads
in place. GPU and TPU compilers pick operand layouts of their own; the change is not measured
there (no device was lent).
"""

from __future__ import annotations

import math

import jax


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
  """sum_k x[..., k] w[k, ...] over x's last ``contract`` axes and w's first ``contract`` axes.

  E.g. (B, T, D) x (D, H, K) -> (B, T, H, K); with ``contract=2`` (B, T, H, K) x (H, K, D)
  -> (B, T, D). The operands keep their dtypes (cast before calling).
  """
  lead, k_shape = x.shape[:-contract], x.shape[-contract:]
  if w.shape[:contract] != k_shape:
    raise ValueError(f"dense: x {x.shape} and w {w.shape} do not share {contract} axes")
  out_shape = w.shape[contract:]
  k = math.prod(k_shape)
  y = x.reshape(-1, k) @ w.reshape(k, math.prod(out_shape))
  return y.reshape(lead + out_shape)
