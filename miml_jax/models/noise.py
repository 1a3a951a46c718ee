"""Fixed noise-residual filters: the three SRM high-pass kernels (docs/methods.md, Web-IML).

Manipulations rarely change colours; they change local noise, compression and resampling
statistics. The SRM kernels (a 3x3 second-order, the 5x5 "KV" and a 1-D second-order filter),
each applied to R, G and B, expose those statistics as 9 residual channels. ManTraNet uses them
in its first layer; Web-IML can take them as an extra input view (`model.noise_view='srm'`).
Bayar's constrained kernels (`bayar_project`) are the learned counterpart: each is a
prediction-error filter (centre -1, the other taps summing to 1) that cannot pass image content.
"""

import jax
import jax.numpy as jnp
import numpy as np

_K1 = np.zeros((5, 5), np.float32)
_K1[1:4, 1:4] = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]], np.float32) / 4.0
_K2 = (
  np.array(
    [
      [-1, 2, -2, 2, -1],
      [2, -6, 8, -6, 2],
      [-2, 8, -12, 8, -2],
      [2, -6, 8, -6, 2],
      [-1, 2, -2, 2, -1],
    ],
    np.float32,
  )
  / 12.0
)
_K3 = np.zeros((5, 5), np.float32)
_K3[2, 1:4] = np.array([1, -2, 1], np.float32) / 2.0
SRM_KERNELS = np.stack([_K1, _K2, _K3])  # (3, 5, 5)
# Keras' K.epsilon(), which the Bayar (and ManTra-Net's unit_norm) constraint adds to its
# denominator.
KERAS_EPSILON = 1e-7


def bayar_project(w: jax.Array) -> jax.Array:
  """Keras' BayarConstraint on a (kh, kw, in, out) kernel: centre tap 0, the others divided by
  their sum (+ K.epsilon()) per (in, out) pair, then the centre set to -1."""
  kh, kw = w.shape[:2]
  mask = jnp.zeros((kh, kw, 1, 1), w.dtype).at[kh // 2, kw // 2].set(1)
  w = w * (1 - mask)
  w = w / (jnp.sum(w, axis=(0, 1), keepdims=True) + KERAS_EPSILON)
  return w - mask


def srm_residuals(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, 3C): kernel k on channel c is output channel C * k + c.

  Reflect padding keeps the borders free of artificial edges; computed in float32.
  """
  channels = x.shape[-1]
  # Depthwise conv (feature_group_count = channels): group c owns outputs [3c, 3c + 3), one per
  # kernel; the outputs are reordered kernel-major below.
  kernel = np.tile(SRM_KERNELS.transpose(1, 2, 0), (1, 1, channels))[:, :, None, :]
  padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  out = jax.lax.conv_general_dilated(
    padded,
    jnp.asarray(kernel),
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=channels,
  )
  order = [c * 3 + k for k in range(3) for c in range(channels)]
  return out[..., order]


def srm_energy(x: jax.Array, window: int = 5, eps: float = 1e-3) -> jax.Array:
  """Local noise level: log of the mean squared SRM residual over a window, per channel.

  Unlike the raw residuals (whose sign and phase are random), the energy is a smooth positive
  map that a strided, LayerNorm-ed stem can read directly.
  """
  energy = srm_residuals(x) ** 2
  pad = window // 2
  padded = jnp.pad(energy, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  summed = jax.lax.reduce_window(
    padded, 0.0, jax.lax.add, (1, window, window, 1), (1, 1, 1, 1), "VALID"
  )
  return jnp.log(summed / (window * window) + eps)
