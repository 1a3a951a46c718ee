"""Segmentation losses: OHEM cross-entropy and plain cross-entropy with an ignore label, and the
deep-supervision sum over the model's outputs.

OHEM follows mmseg's OhemCrossEntropy (from PIDNet), the loss of the official APSC-Net config:
softmax probability of the true class per valid pixel; threshold = max(thresh, the
`min_kept`-th smallest such probability over the whole batch); average the CE of pixels whose
probability is below the threshold.
"""

import jax
import jax.numpy as jnp

from miml_jax.input.transforms import IGNORE_LABEL
from miml_jax.models.layers import resize_bilinear


def _pixel_ce(logits, labels):
  """Per-pixel CE and true-class probability; invalid pixels get 0 CE and probability +inf."""
  valid = labels != IGNORE_LABEL
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  true_log_prob = jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  ce = jnp.where(valid, -true_log_prob, 0.0)
  prob = jnp.where(valid, jnp.exp(true_log_prob), jnp.inf)
  return ce, prob, valid


def cross_entropy(logits, labels):
  ce, _, valid = _pixel_ce(logits, labels)
  return ce.sum() / jnp.maximum(valid.sum(), 1)


def ohem_cross_entropy(logits, labels, thresh: float = 0.7, min_kept: int = 100_000):
  ce, prob, valid = _pixel_ce(logits, labels)
  flat = prob.reshape(-1)
  num_valid = valid.sum()
  # Index of the min_kept-th smallest probability, clipped to the valid count (mmseg's rule:
  # pred[min(min_kept, n - 1)] over the sorted valid probabilities; +inf sorts invalid last).
  kth = jnp.clip(jnp.minimum(min_kept, num_valid - 1), 0, flat.size - 1)
  threshold = jnp.maximum(jnp.sort(flat)[kth], thresh)
  keep = valid & (prob < threshold)
  return jnp.where(num_valid > 0, (ce * keep).sum() / jnp.maximum(keep.sum(), 1), 0.0)


def dice_loss(logits, labels, smooth: float = 1.0):
  """1 - soft Dice of the class-1 (tampered) probability, pooled over the batch's valid pixels.

  Pooling over the batch rather than per image keeps it defined on authentic images (empty
  masks), which per-image Dice is not. Unlike CE, Dice does not let a rare positive class be
  ignored: predicting all-authentic scores the maximum loss.
  """
  valid = labels != IGNORE_LABEL
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1] * valid
  target = (labels == 1).astype(jnp.float32)
  intersection = jnp.sum(prob * target)
  return 1.0 - (2.0 * intersection + smooth) / (jnp.sum(prob) + jnp.sum(target) + smooth)


def segmentation_loss(outputs: dict, labels: jnp.ndarray, config) -> tuple[jnp.ndarray, dict]:
  """Weighted sum of the loss on the final logits and on each auxiliary output.

  Logits (at 1/4 resolution) are upsampled to the label size first, as mmseg does.
  config: loss.name ('ohem' | 'ce'), loss.weights (final first, then aux in order; the official
  recipe weighs every output by 0.5), loss.ohem_thresh, loss.ohem_min_kept, and optionally
  loss.dice_weight (default 0, the official recipe): each output's term becomes
  CE + dice_weight * Dice.
  """
  dice_weight = config.get("dice_weight", 0.0)
  size = labels.shape[1:3]
  all_logits = [outputs["logits"], *outputs.get("aux", ())]
  weights = list(config.weights)
  if len(weights) < len(all_logits):
    weights += [weights[-1]] * (len(all_logits) - len(weights))
  terms = {}
  total = 0.0
  for i, (logits, weight) in enumerate(zip(all_logits, weights)):
    logits = resize_bilinear(logits.astype(jnp.float32), size, align_corners=False)
    if config.name == "ohem":
      value = ohem_cross_entropy(logits, labels, config.ohem_thresh, config.ohem_min_kept)
    elif config.name == "ce":
      value = cross_entropy(logits, labels)
    else:
      raise ValueError(f"loss.name: unknown loss '{config.name}' (ohem, ce)")
    if dice_weight:
      value = value + dice_weight * dice_loss(logits, labels)
    terms["loss_final" if i == 0 else f"loss_aux{i - 1}"] = value
    total = total + weight * value
  return total, terms
