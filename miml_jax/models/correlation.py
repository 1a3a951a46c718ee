"""All-pairs feature correlation arranged over cyclic spatial shifts, and its pooling to a few
channels: the correlation op of SACM (CAAA's SDG annotator, `safm_convb.py` of the official
code), shared by every pair model that matches features across two unaligned images.

Definitions (NHWC; a and b are (B, H, W, C) maps of the same size; N = H * W):

  correlation_volume(a, b)[n, r, c, s] = <a[n, r, c], b[n, (r + dy) % H, (c + dx) % W]> / C,
  with s = dy * W + dx

i.e. every pixel of `a` against every pixel of `b`, the last axis indexing the *cyclic shift*
from the pixel of `a` to the one of `b` rather than the absolute position in `b`. That is what
the official `Correlation_Module` + `get_mapping_indices` compute: the dot products are divided
by the channel count (no L2 normalisation), and the result lies in `a`'s spatial frame.

`CorrelationPooling` reduces the shift axis to 2 + num_learned channels: the max, the mean and
a learned 1x1 conv over all N shifts (official `Poolopt_on_Corrmat`: children `fc`, so the torch
key of the conv is `<owner>.fc.weight` of shape (num_learned, N, 1, 1)). Because the conv reads
the shift axis as channels, a model using it is tied to one feature-map size (N = 4096, 64x64,
for SACM's 512x512 inputs).

The shift arrangement is done with pads, reshapes and slices (a "skew" per axis), not a gather:
it is exact, deterministic in its gradient (no scatter-add) and maps onto TPU/GPU layouts.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.models import layers

Array = jax.Array
Dtype = Any


def _skew(m: Array) -> Array:
  """(..., P, P) -> (..., P, P) with out[..., p, x] = m[..., p, (p + x) % P].

  Row p of [m, m] holds m[p, (p + x) % P] at column p + x; in the row-major flattening that is
  offset p * (2P + 1) + x, so padding the flat array by P and reading it as rows of 2P + 1
  lines every row up at column 0.
  """
  p = m.shape[-1]
  lead = m.shape[:-2]
  doubled = jnp.concatenate([m, m], axis=-1).reshape(lead + (2 * p * p,))
  padded = jnp.pad(doubled, [(0, 0)] * len(lead) + [(0, p)])
  return padded.reshape(lead + (p, 2 * p + 1))[..., :p]


def correlation_volume(a: Array, b: Array) -> Array:
  """(B, H, W, H * W): dot products of a's pixels with b's, / C, over cyclic shifts (see the
  module docstring); computed in float32 whatever the inputs' dtype."""
  if a.ndim != 4 or a.shape != b.shape:
    raise ValueError(
      f"correlation_volume: a and b must be (B, H, W, C) maps of one shape, got "
      f"{tuple(a.shape)} and {tuple(b.shape)}"
    )
  n, h, w, c = a.shape
  a32 = a.astype(jnp.float32) / c
  b32 = b.astype(jnp.float32)
  # m[n, r, x, q, y]: pixel (r, x) of a against pixel (q, y) of b.
  m = jnp.einsum("nrxc,nqyc->nrxqy", a32, b32)
  # Column shift: (n, r, q, x, y) -> skew over (x, y) gives [.., x, dx] with y = (x + dx) % W.
  m = _skew(m.transpose(0, 1, 3, 2, 4))
  # Row shift: (n, x, dx, r, q) -> skew over (r, q) gives [.., r, dy] with q = (r + dy) % H.
  m = _skew(m.transpose(0, 3, 4, 1, 2))
  # (n, x, dx, r, dy) -> (n, r, x, dy, dx) -> shift index dy * W + dx.
  return m.transpose(0, 3, 1, 4, 2).reshape(n, h, w, h * w)


class CorrelationPooling(nn.Module):
  """Pools a correlation volume's shift axis: [max, mean, learned 1x1 conv `fc`] channels.

  `__call__(volume)`: (B, H, W, N) -> (B, H, W, 2 + num_learned), float32 max / mean, the conv
  in `dtype`. The conv's input width N is fixed by the first call (by the parameters).
  """

  num_learned: int = 14
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, volume: Array) -> Array:
    learned = layers.conv2d(
      self.num_learned,
      1,
      in_features=volume.shape[-1],
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="fc",
    )(volume.astype(self.dtype))
    return jnp.concatenate(
      [
        jnp.max(volume, axis=-1, keepdims=True).astype(jnp.float32),
        jnp.mean(volume.astype(jnp.float32), axis=-1, keepdims=True),
        learned.astype(jnp.float32),
      ],
      axis=-1,
    )
