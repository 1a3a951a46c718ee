"""The JPEG-domain input view (`model.dct_view`): quantised DCT coefficients on the 8-px grid.

Most edited photos are JPEGs saved twice: the camera's compression, then the editor's. Where
the photo was left alone, its 8x8 DCT coefficients were quantised twice on the same grid, which
leaves periodic gaps and peaks in their histograms (double quantisation); a pasted region,
resampled or shifted off that grid, carries other statistics. Pixel-domain CNNs see this
poorly: the trace is "how close is each coefficient to a multiple of the quantisation step",
not a local texture. CAT-Net (Kwon et al., 2022) reads the quantised coefficients from the
file; a PNG, a decoded frame or an augmented crop has no file, so this view recomputes them:

1. the pixels back from the normalised input (rounded to integers, which also undoes bfloat16
   rounding: its error stays under half a grey level over the 0-255 range), their luma
   (JFIF's Y - 128) and its orthonormal 8x8 DCT-II per block -- the transform JPEG uses, so
   a decoded JPEG's coefficients sit within rounding noise of multiples of its table's steps;
2. per image and per frequency, the quantisation step: the largest q <= `max_step` whose
   multiples the coefficients (those not rounded to 0 by q) sit near: on at least
   `min_support` blocks, mean distance under `tolerance` of a step and, in absolute terms,
   within the decoder's rounding noise (the least distance any step leaves); 1 where nothing
   fits (never compressed, or resampled after);
3. per block, |coefficient| / step rounded and clipped at `clip`, one-hot, averaged over a
   `window` x `window` neighbourhood of blocks: local histograms, where double quantisation
   shows as missing or doubled bins; with log2 of the steps, as CAT-Net multiplies in its
   quantisation table;
4. a learned linear map of those (`width` channels, GELU), repeated over each block's 8x8
   pixels so it can join the pixel channels before the backbone's stem;
5. optionally (`image_head` > 0), the image-wide average of those features through a small
   MLP whose logits are added to the image head's (`HistogramDetector`).

Steps 1-3 hold no parameters and pass no gradient (the rounding has none). The grid is the
image's own (0, 0): crops must keep it (the real-transfer recipe crops on multiples of 8).
Our reconstruction, not a published layer; docs/methods.md ("The JPEG view").
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import config as config_lib
from miml_jax.input import transforms

BLOCK = 8


def _dct_matrix(n: int = BLOCK) -> np.ndarray:
  """Orthonormal DCT-II: row u is the u-th basis vector (JPEG's FDCT is D @ block @ D.T)."""
  k = np.arange(n)
  d = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2.0 / n)
  d[0] /= np.sqrt(2.0)
  return d.astype(np.float32)


def _zigzag(n: int = BLOCK) -> np.ndarray:
  """Flat indices u * n + v of an n x n block in JPEG's zig-zag order (low frequencies first)."""
  order = sorted(
    ((u, v) for u in range(n) for v in range(n)),
    key=lambda p: (p[0] + p[1], p[1] if (p[0] + p[1]) % 2 == 0 else p[0]),
  )
  return np.array([u * n + v for u, v in order])


# A step fits when its mean absolute distance is within NOISE_RATIO x the rounding noise +
# NOISE_SLACK (coefficient units): measured on three COCO photos re-saved at quality 50, the
# true step leaves 0.3-1.1, the step above it 1.4-3.6.
NOISE_RATIO, NOISE_SLACK = 1.5, 0.25
DCT = _dct_matrix()
ZIGZAG = _zigzag()


@dataclasses.dataclass(frozen=True)
class DCTViewConfig:
  """`model.dct_view`: None (off) or a dict of these fields."""

  # AC frequencies used, in zig-zag order from (0, 1).
  frequencies: int = config_lib.setting(15, ge=1, le=63)
  clip: int = config_lib.setting(10, ge=1)
  window: int = config_lib.setting(5, ge=1)
  max_step: int = config_lib.setting(32, ge=2)
  # A step is plausible if the coefficients sit nearer its multiples than this fraction of it,
  # on average (unquantised values sit 0.25 away from any step's).
  tolerance: float = config_lib.setting(0.2, gt=0.0, lt=0.5)
  min_support: int = config_lib.setting(16, ge=1)
  width: int = config_lib.setting(16, ge=1)
  # Width of the HistogramDetector whose logits join the image head's; 0 = none.
  image_head: int = config_lib.setting(0, ge=0)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "DCTViewConfig | None":
    """None stays None (the view is off); a dict is checked key by key."""
    return None if d is None else config_lib.settings_from_config(cls, d, "model.dct_view")


def pixels(x: jax.Array) -> jax.Array:
  """Normalised (B, H, W, 3) input -> its integer RGB values 0..255, float32."""
  return jnp.clip(jnp.round(transforms.denormalize(x)), 0, 255)


def block_dct(rgb: jax.Array) -> jax.Array:
  """(B, H, W, 3) RGB 0..255, H and W multiples of 8 -> (B, H/8, W/8, 64) luma DCT
  coefficients per block, zig-zag order."""
  b, h, w, _ = rgb.shape
  luma = rgb @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32) - 128.0
  blocks = luma.reshape(b, h // BLOCK, BLOCK, w // BLOCK, BLOCK)
  d = jnp.asarray(DCT)
  coefficients = jnp.einsum("um,vn,bimjn->bijuv", d, d, blocks, precision="highest")
  return coefficients.reshape(b, h // BLOCK, w // BLOCK, BLOCK * BLOCK)[..., ZIGZAG]


def quantisation_steps(
  coefficients: jax.Array, max_step: int, tolerance: float, min_support: int
) -> jax.Array:
  """(B, H', W', F) coefficients -> (B, F) the step each frequency was quantised with (1 if
  none fits); see the module docstring."""
  magnitude = jnp.abs(coefficients).reshape(coefficients.shape[0], -1, coefficients.shape[-1])

  def distances(q):
    ratio = magnitude / q
    counted = (ratio >= 0.5).astype(jnp.float32)  # Coefficients that q does not round to 0.
    support = counted.sum(axis=1)
    distance = (jnp.abs(ratio - jnp.round(ratio)) * counted).sum(axis=1) / jnp.maximum(support, 1.0)
    return distance, support

  # One candidate at a time (lax.map): memory stays that of the coefficients, whatever the
  # image size.
  candidates = jnp.arange(2, max_step + 1, dtype=jnp.float32)
  relative, support = jax.lax.map(distances, candidates)  # (Q, B, F) each
  absolute = relative * candidates[:, None, None]  # In coefficient units.
  plausible = (relative < tolerance) & (support >= min_support)
  # The true step and its divisors leave the same absolute distance, the decoder's rounding
  # noise; a step just above the true one, which small multiples nearly fit, leaves more.
  noise = jnp.min(jnp.where(plausible, absolute, jnp.inf), axis=0)
  fits = plausible & (absolute <= NOISE_RATIO * noise + NOISE_SLACK)
  return jnp.max(jnp.where(fits, candidates[:, None, None], 1.0), axis=0)


def histogram_features(rgb: jax.Array, cfg: DCTViewConfig) -> jax.Array:
  """(B, H, W, 3) RGB 0..255 -> (B, H/8, W/8, F * (clip + 1) + F): the local histograms of the
  quantised coefficients and log2 of the steps (steps 1-3 of the module docstring)."""
  coefficients = block_dct(rgb)[..., 1 : 1 + cfg.frequencies]
  steps = quantisation_steps(coefficients, cfg.max_step, cfg.tolerance, cfg.min_support)
  levels = jnp.minimum(jnp.round(jnp.abs(coefficients) / steps[:, None, None, :]), cfg.clip)
  onehot = jax.nn.one_hot(levels.astype(jnp.int32), cfg.clip + 1, dtype=jnp.float32)
  b, hb, wb = onehot.shape[:3]
  onehot = onehot.reshape(b, hb, wb, -1)
  if cfg.window > 1:
    # Mean over the in-image blocks of each window (the count divides out the border).
    window, pad = (1, cfg.window, cfg.window, 1), cfg.window // 2
    padding = ((0, 0), (pad, cfg.window - 1 - pad), (pad, cfg.window - 1 - pad), (0, 0))
    total = jax.lax.reduce_window(onehot, 0.0, jax.lax.add, window, (1,) * 4, padding)
    count = jax.lax.reduce_window(
      jnp.ones((1, hb, wb, 1), jnp.float32), 0.0, jax.lax.add, window, (1,) * 4, padding
    )
    onehot = total / count
  log_steps = jnp.broadcast_to(
    jnp.log2(steps)[:, None, None, :] / 5.0, (b, hb, wb, steps.shape[-1])
  )
  return jnp.concatenate([onehot, log_steps], axis=-1)


class DCTView(nn.Module):
  """Normalised (B, H, W, 3) input -> ((B, H, W, width) the view of the module docstring,
  (B, F * (clip + 1) + F) its features averaged over the image: the image-wide histograms)."""

  cfg: DCTViewConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.shape[-1] != 3 or x.shape[1] % BLOCK or x.shape[2] % BLOCK:
      raise ValueError(
        f"model.dct_view: expected (B, H, W, 3), H and W multiples of 8, got {x.shape}"
      )
    features = jax.lax.stop_gradient(histogram_features(pixels(x), self.cfg))
    y = nn.Dense(self.cfg.width, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(
      features.astype(self.dtype)
    )
    y = nn.gelu(y, approximate=False)
    return jnp.repeat(jnp.repeat(y, BLOCK, axis=1), BLOCK, axis=2), features.mean(axis=(1, 2))


class HistogramDetector(nn.Module):
  """Image-wide histograms (B, C) -> (B, num_classes) logits: Dense, GELU, Dense.

  Double quantisation is a property of the whole image's histograms; the image head, which
  max-pools local decoder features, does not see them as such. These logits are added to its
  own (`DCTViewConfig.image_head`), and train through the image-level loss.
  """

  width: int
  num_classes: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, histograms: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    z = nn.gelu(nn.Dense(self.width, name="hidden", **kw)(histograms.astype(self.dtype)))
    return nn.Dense(self.num_classes, name="out", **kw)(z).astype(jnp.float32)
