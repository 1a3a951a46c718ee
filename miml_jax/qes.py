"""QES, the quality evaluation score that filters automatic annotations (MIML, CVPR 2024).

The CAAA auto-annotation pipeline has no ground truth for the web forgeries it annotates, so it
scores each predicted SOFT mask p in [0, 1] by how much of the predicted region is confident:

    QES = count(p > 15/16) / (count(p > 1/16) + 1e-8)

and keeps an annotation iff QES > threshold (0.5 in the official SDG script; the MIMLv2 cut-off
is not public, hence a parameter). This is the official formula with `>` on both sides, and the
float32 p = grey / 255 of the official script gives the same counts as `io.read_soft_mask`.

QES needs the soft mask: on a binarised mask (only 0 and 1) every predicted pixel is above 15/16,
so QES is 1.0 for any non-empty mask and 0.0 for an empty one; it tells nothing about quality.

`qes` scores one (H, W) mask and is traceable (use it inside your own jitted annotation step);
`qes_batch` is jitted and vmapped over a padded batch of masks of different sizes; `qes_files`
scores soft-mask files on disk in fixed-shape chunks; `qes_numpy` is the same score without a
device.
"""

from collections.abc import Sequence
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import io
from miml_jax.errors import UserInputError

DEFAULT_LOW = 1.0 / 16.0
DEFAULT_HIGH = 15.0 / 16.0
DEFAULT_EPS = 1e-8


def _check_params(low: float, high: float, eps: float):
  if not 0.0 <= low < high < 1.0:
    raise ValueError(f"QES thresholds must satisfy 0 <= low < high < 1, got low={low}, high={high}")
  # eps = 0 would turn the score of an empty mask into 0/0 = NaN instead of 0.
  if not eps > 0.0:
    raise ValueError(f"QES eps must be > 0, got {eps}")


def _qes_core(prob, valid, *, low, high, eps):
  """QES of one (H, W) mask; the traceable body shared by `qes` and `qes_batch`."""
  confident = prob > high
  region = prob > low
  # NaN fails both comparisons, so it is caught here as well as values outside [0, 1].
  bad = ~((prob >= 0) & (prob <= 1))
  if valid is not None:
    confident &= valid
    region &= valid
    bad &= valid
  # Integer counts are exact; a float32 sum stops counting exactly past 2^24 pixels.
  num = jnp.sum(confident, dtype=jnp.int32).astype(jnp.float32)
  den = jnp.sum(region, dtype=jnp.int32).astype(jnp.float32)
  score = num / (den + eps)
  return jnp.where(jnp.any(bad), jnp.nan, score)


# Jitted even for one mask: op-by-op execution would compile each of the dozen ops separately for
# every new mask size; this compiles once per size. Inside a caller's jit it is simply inlined.
_qes_one = functools.partial(jax.jit, static_argnames=("low", "high", "eps"))(_qes_core)


def _as_probs(prob) -> jax.Array:
  prob = jnp.asarray(prob)
  # Integer input (e.g. an unscaled 0..255 mask) is compared as float, and flagged as NaN.
  if not jnp.issubdtype(prob.dtype, jnp.floating):
    prob = prob.astype(jnp.float32)
  return prob


def _as_valid(valid, shape) -> jax.Array | None:
  if valid is None:
    return None
  valid = jnp.asarray(valid, dtype=bool)
  if valid.shape != shape:
    raise ValueError(f"valid has shape {valid.shape} but the masks have shape {shape}")
  return valid


def qes(
  prob: jax.Array | np.ndarray,
  valid: jax.Array | np.ndarray | None = None,
  *,
  low: float = DEFAULT_LOW,
  high: float = DEFAULT_HIGH,
  eps: float = DEFAULT_EPS,
) -> jax.Array:
  """QES of one soft mask.

  Args:
    prob: (H, W) probabilities in [0, 1].
    valid: optional (H, W) boolean mask of the real pixels; pixels where it is False (padding)
      never count, whatever their value.
    low: a pixel belongs to the predicted region iff p > low.
    high: a pixel is confident iff p > high.
    eps: added to the denominator, so an empty mask (no pixel above `low`) scores 0.0.

  Returns:
    A float32 scalar in [0, 1]. NaN when a counted pixel is non-finite or outside [0, 1]: inside
    jit we cannot raise, and a NaN score is never kept (NaN > threshold is False), so bad input
    (e.g. a 0..255 mask passed without scaling) shows up instead of silently counting as
    "confident".
  """
  _check_params(low, high, eps)
  prob = _as_probs(prob)
  if prob.ndim != 2:
    raise ValueError(f"qes expects one (H, W) mask, got shape {prob.shape}")
  # float() so that 1 and 1.0, or a numpy scalar, hit the same compilation cache entry.
  return _qes_one(
    prob, _as_valid(valid, prob.shape), low=float(low), high=float(high), eps=float(eps)
  )


@functools.partial(jax.jit, static_argnames=("low", "high", "eps"))
def _qes_batch(probs, valid, *, low, high, eps):
  one = functools.partial(_qes_core, low=low, high=high, eps=eps)
  if valid is None:
    return jax.vmap(lambda prob: one(prob, None))(probs)
  return jax.vmap(one)(probs, valid)


def qes_batch(
  probs: jax.Array | np.ndarray,
  valid: jax.Array | np.ndarray | None = None,
  *,
  low: float = DEFAULT_LOW,
  high: float = DEFAULT_HIGH,
  eps: float = DEFAULT_EPS,
) -> jax.Array:
  """QES of a batch of soft masks, jitted and vmapped.

  Args:
    probs: (B, H, W) probabilities in [0, 1]; masks of different sizes are padded into one batch
      (see `pad_to_batch`).
    valid: optional (B, H, W) boolean mask of the real pixels of each item.
    low, high, eps: as in `qes`. They are static: a new value compiles once, the same values
      reuse the compiled function for every batch of the same shape.

  Returns:
    (B,) float32 scores, as `qes` gives for each item.
  """
  _check_params(low, high, eps)
  probs = _as_probs(probs)
  if probs.ndim != 3:
    raise ValueError(f"qes_batch expects (B, H, W) masks, got shape {probs.shape}")
  return _qes_batch(
    probs, _as_valid(valid, probs.shape), low=float(low), high=float(high), eps=float(eps)
  )


def qes_numpy(
  prob: np.ndarray,
  *,
  low: float = DEFAULT_LOW,
  high: float = DEFAULT_HIGH,
  eps: float = DEFAULT_EPS,
) -> float:
  """QES of one (H, W) soft mask in NumPy, for code without a device (dataset builders' Beam
  workers, where a compilation per mask size would cost more than the score): the same counts
  as `qes`, NaN for values outside [0, 1] alike."""
  _check_params(low, high, eps)
  prob = np.asarray(prob, np.float32)
  if not np.all((prob >= 0) & (prob <= 1)):
    return float("nan")
  num = np.float32(np.count_nonzero(prob > np.float32(high)))
  den = np.float32(np.count_nonzero(prob > np.float32(low)))
  return float(num / (den + np.float32(eps)))


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def pad_to_batch(
  masks: Sequence[np.ndarray], *, multiple: int = 32, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Pads soft masks of different sizes into one batch, top-left aligned.

  Args:
    masks: (H_i, W_i) soft masks; values are copied as float32 without rescaling.
    multiple: the padded height and width are rounded up to a multiple of this, so that batches
      of slightly different sizes share one compiled shape.
    batch_size: if given, the batch is padded with all-padding items up to this many (they score
      0.0), so a short final chunk reuses the compiled shape of the full ones.

  Returns:
    probs (B, Hmax, Wmax) float32 with zeros in the padding, and valid (B, Hmax, Wmax) bool, True
    on the real pixels.
  """
  if not masks:
    raise ValueError("pad_to_batch needs at least one mask")
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  for index, mask in enumerate(masks):
    if np.ndim(mask) != 2:
      raise ValueError(f"mask #{index} has shape {np.shape(mask)}, expected (H, W)")
  count = len(masks)
  if batch_size is None:
    batch_size = count
  elif batch_size < count:
    raise ValueError(f"batch_size {batch_size} is smaller than the {count} masks given")
  height = _round_up(max(np.shape(m)[0] for m in masks), multiple)
  width = _round_up(max(np.shape(m)[1] for m in masks), multiple)
  probs = np.zeros((batch_size, height, width), np.float32)
  valid = np.zeros((batch_size, height, width), bool)
  for index, mask in enumerate(masks):
    h, w = np.shape(mask)
    probs[index, :h, :w] = mask
    valid[index, :h, :w] = True
  return probs, valid


def _read_checked(path: str) -> np.ndarray:
  mask = io.read_soft_mask(path)
  if mask.ndim != 2:
    raise UserInputError(
      f"{os.fspath(path)}: expected a single-channel soft mask, decoded shape is {mask.shape}"
    )
  # Float TIFFs are divided by 255 like 8-bit files and can land outside [0, 1]; say so here
  # rather than return a NaN score with no file name attached.
  if not (np.all(np.isfinite(mask)) and mask.min() >= 0.0 and mask.max() <= 1.0):
    finite = mask[np.isfinite(mask)]
    detail = (
      f"{mask.size - finite.size} non-finite values"
      if finite.size < mask.size
      else f"min {finite.min()}, max {finite.max()}"
    )
    raise UserInputError(
      f"{os.fspath(path)}: soft mask values must be finite and within [0, 1] after scaling, "
      f"got {detail}"
    )
  return mask


def qes_files(
  paths: Sequence[str | os.PathLike],
  *,
  batch_size: int = 16,
  multiple: int = 32,
  low: float = DEFAULT_LOW,
  high: float = DEFAULT_HIGH,
  eps: float = DEFAULT_EPS,
) -> list[float]:
  """QES of soft-mask files (8-bit or 16-bit grey PNG, or anything `io.read_soft_mask` reads).

  Files are read and scored `batch_size` at a time, so memory stays bounded on large folders.
  Each chunk is padded to its largest mask rounded up to `multiple`, and the last chunk is padded
  to a full batch, so folders of same-sized masks compile once.

  A binarised mask (only 0 and 255) is legal input, but its QES is 1.0 whenever it is non-empty
  (every predicted pixel is "confident"), so the score says nothing: score the soft masks.

  Returns:
    One Python float per file, in input order.

  Raises:
    UserInputError: naming the file, when it is missing or unreadable, does not decode to a
      single-channel (H, W) mask, or has values outside [0, 1] after scaling.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  paths = list(paths)
  scores: list[float] = []
  for start in range(0, len(paths), batch_size):
    chunk = paths[start : start + batch_size]
    masks = [_read_checked(path) for path in chunk]
    probs, valid = pad_to_batch(masks, multiple=multiple, batch_size=batch_size)
    values = np.asarray(qes_batch(probs, valid, low=low, high=high, eps=eps))
    scores.extend(float(value) for value in values[: len(chunk)])
  return scores
