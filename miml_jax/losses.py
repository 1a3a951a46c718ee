"""Segmentation losses: OHEM cross-entropy and plain cross-entropy with an ignore label, and the
deep-supervision sum over the model's outputs.

OHEM follows mmseg's OhemCrossEntropy (from PIDNet), the loss of the official APSC-Net config:
softmax probability of the true class per valid pixel; threshold = max(thresh, the
`min_kept`-th smallest such probability over the whole batch); average the CE of pixels whose
probability is below the threshold.
"""

import dataclasses

import jax
import jax.numpy as jnp

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
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
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1]
  return soft_dice_loss(prob, labels == 1, valid, smooth)


def soft_dice_loss(prob, target, valid, smooth: float = 1.0):
  """1 - soft Dice of a probability map against a binary target over the `valid` pixels,
  pooled over the whole batch (see `dice_loss`)."""
  prob = prob * valid
  target = (target & valid).astype(jnp.float32)
  intersection = jnp.sum(prob * target)
  return 1.0 - (2.0 * intersection + smooth) / (jnp.sum(prob) + jnp.sum(target) + smooth)


def _ohem(logits, labels, config):
  return ohem_cross_entropy(logits, labels, config.ohem_thresh, config.ohem_min_kept)


def _ce(logits, labels, config):
  del config
  return cross_entropy(logits, labels)


# loss.name -> the per-pixel loss of one output: (logits at label size, labels, the loss
# section) -> scalar. SegmentationLossConfig.name is checked against it.
LOSSES = {"ohem": _ohem, "ce": _ce}


def _check_weights(weights) -> str | None:
  if not weights:
    return "expected at least one weight (the final output's)"
  if any(w < 0 for w in weights):
    return f"expected non-negative weights, got {weights!r}"
  return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SegmentationLossConfig:
  """The `loss` section of the segmentation task (config.validate checks it)."""

  name: str = config_lib.setting(choices=LOSSES)
  # Final output first, then the auxiliary ones in order; the last repeats for any beyond.
  weights: tuple[float, ...] = config_lib.setting(check=_check_weights)
  # OHEM's probability threshold and kept-pixel floor (ohem_cross_entropy's defaults).
  ohem_thresh: float = config_lib.probability(0.7)
  ohem_min_kept: int = config_lib.setting(100_000, ge=0)
  # Each output's term becomes loss + dice_weight * Dice; 0 (the official recipe): none.
  dice_weight: float = config_lib.setting(0.0, ge=0)
  # The image head's CE, when the model has one. Required: the trainer has always read it
  # directly, and a default would silently leave an image head untrained (or train one).
  image_weight: float = config_lib.setting(ge=0)
  # Detection from the map itself: BCE of "any pixel tampered" against the mean of the final
  # output's `map_detection_topk` share of highest tampered-minus-pristine logits, a smooth
  # version of the map maximum an image-level detector reads. Unlike the image head's term, its
  # gradient reaches the backbone: an untouched photo must keep its whole map low. 0: off.
  map_detection_weight: float = config_lib.setting(0.0, ge=0)
  map_detection_topk: float = config_lib.setting(0.01, gt=0, le=1)


def map_detection_loss(logits, image_labels, topk: float = 0.01):
  """BCE of per-image labels (B,) {0, 1} against the mean of the `topk` share (at least one
  pixel) of the largest tampered-minus-pristine logits of (B, h, w, 2) logits, at the logits'
  own resolution (the pooled score does not need the labels' size)."""
  margin = logits[..., 1].astype(jnp.float32) - logits[..., 0].astype(jnp.float32)
  margin = margin.reshape(margin.shape[0], -1)
  k = max(1, int(round(topk * margin.shape[1])))
  score = jax.lax.top_k(margin, k)[0].mean(axis=1)
  # -log sigmoid(score) for tampered images, -log sigmoid(-score) for untouched ones.
  signed = jnp.where(image_labels > 0, score, -score)
  return jnp.mean(jax.nn.softplus(-signed))


def segmentation_loss(outputs: dict, labels: jnp.ndarray, config) -> tuple[jnp.ndarray, dict]:
  """Weighted sum of the loss on the final logits and on each auxiliary output.

  Logits (at 1/4 resolution) are upsampled to the label size first, as mmseg does.
  config: the `loss` section (SegmentationLossConfig): loss.name (a key of LOSSES),
  loss.weights (final first, then aux in order; the official recipe weighs every output by
  0.5), loss.ohem_thresh, loss.ohem_min_kept, and optionally loss.dice_weight (default 0, the
  official recipe): each output's term becomes CE + dice_weight * Dice.
  """
  # Sections that did not go through config.validate (tests, older callers) may lack it.
  dice_weight = config.get("dice_weight", 0.0)
  pixel_loss = LOSSES.get(config.name)
  if pixel_loss is None:
    raise UserInputError(f"loss.name: unknown loss {config.name!r} (known: {', '.join(LOSSES)})")
  size = labels.shape[1:3]
  all_logits = [outputs["logits"], *outputs.get("aux", ())]
  weights = list(config.weights)
  if len(weights) < len(all_logits):
    weights += [weights[-1]] * (len(all_logits) - len(weights))
  terms = {}
  total = 0.0
  for i, (logits, weight) in enumerate(zip(all_logits, weights)):
    logits = resize_bilinear(logits.astype(jnp.float32), size, align_corners=False)
    value = pixel_loss(logits, labels, config)
    if dice_weight:
      value = value + dice_weight * dice_loss(logits, labels)
    terms["loss_final" if i == 0 else f"loss_aux{i - 1}"] = value
    total = total + weight * value
  return total, terms
