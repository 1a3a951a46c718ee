"""Losses against plain NumPy statements of mmseg's OhemCrossEntropy and masked CE."""

import ml_collections
import numpy as np
import pytest

from miml_jax import losses
from miml_jax.input.transforms import IGNORE_LABEL


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def ohem_reference(logits, labels, thresh, min_kept):
  """mmseg OhemCrossEntropy, restated: sort valid true-class probs, threshold, mean kept CE."""
  prob = _softmax(logits.astype(np.float64))
  valid = labels != IGNORE_LABEL
  safe = np.where(valid, labels, 0)
  true_prob = np.take_along_axis(prob, safe[..., None], -1)[..., 0]
  ce = -np.log(true_prob)
  p = np.sort(true_prob[valid])
  if p.size == 0:
    return 0.0
  threshold = max(p[min(min_kept, p.size - 1)], thresh)
  keep = valid & (true_prob < threshold)
  return ce[keep].mean() if keep.any() else 0.0


@pytest.mark.parametrize("min_kept", [1, 10, 50, 10_000])
@pytest.mark.parametrize("thresh", [0.3, 0.7, 0.99])
def test_ohem_matches_reference(min_kept, thresh):
  rng = np.random.default_rng(min_kept)
  logits = rng.normal(size=(2, 6, 5, 2)).astype(np.float32) * 2
  labels = rng.integers(0, 2, size=(2, 6, 5)).astype(np.uint8)
  labels[0, 0, :3] = IGNORE_LABEL
  got = float(losses.ohem_cross_entropy(logits, labels, thresh, min_kept))
  np.testing.assert_allclose(got, ohem_reference(logits, labels, thresh, min_kept), rtol=1e-5)


def test_cross_entropy_ignores_label():
  logits = np.array([[[[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]]]], np.float32)
  labels = np.array([[[0, 0, IGNORE_LABEL]]], np.uint8)
  expected = np.mean(
    [-np.log(_softmax(np.array([2.0, 0]))[0]), -np.log(_softmax(np.array([0.0, 2]))[0])]
  )
  np.testing.assert_allclose(float(losses.cross_entropy(logits, labels)), expected, rtol=1e-6)


def test_all_ignored_gives_zero():
  logits = np.zeros((1, 4, 4, 2), np.float32)
  labels = np.full((1, 4, 4), IGNORE_LABEL, np.uint8)
  assert float(losses.ohem_cross_entropy(logits, labels)) == 0.0
  assert float(losses.cross_entropy(logits, labels)) == 0.0


def test_deep_supervision_weights_and_upsampling():
  rng = np.random.default_rng(0)
  final = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  aux = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=(1, 16, 16)).astype(np.uint8)
  config = ml_collections.ConfigDict(
    dict(name="ce", weights=(1.0, 0.25), ohem_thresh=0.7, ohem_min_kept=100)
  )
  total, terms = losses.segmentation_loss({"logits": final, "aux": (aux,)}, labels, config)
  assert set(terms) == {"loss_final", "loss_aux0"}
  np.testing.assert_allclose(
    float(total), float(terms["loss_final"]) + 0.25 * float(terms["loss_aux0"]), rtol=1e-6
  )


def dice_reference(logits, labels, smooth=1.0):
  prob = _softmax(logits.astype(np.float64))[..., 1]
  valid = labels != IGNORE_LABEL
  target = labels == 1
  p, t = prob[valid], target[valid]
  return 1.0 - (2.0 * np.sum(p * t) + smooth) / (p.sum() + t.sum() + smooth)


def test_dice_matches_reference_and_punishes_all_authentic():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 6, 5, 2)).astype(np.float32) * 2
  labels = rng.integers(0, 2, size=(2, 6, 5)).astype(np.uint8)
  labels[1, :2] = IGNORE_LABEL
  np.testing.assert_allclose(
    float(losses.dice_loss(logits, labels)), dice_reference(logits, labels), rtol=1e-5
  )
  # Confidently all-authentic on a 10%-positive mask: CE is small, Dice is (almost) 1.
  labels = np.zeros((1, 10, 10), np.uint8)
  labels[0, :1] = 1
  confident_zero = np.zeros((1, 10, 10, 2), np.float32)
  confident_zero[..., 0] = 8.0
  assert float(losses.cross_entropy(confident_zero, labels)) < 1.0
  assert float(losses.dice_loss(confident_zero, labels)) > 0.9
  perfect = np.where(labels[..., None] == 1, [-8.0, 8.0], [8.0, -8.0]).astype(np.float32)
  assert float(losses.dice_loss(perfect, labels)) < 1e-2


def test_dice_weight_adds_dice_to_every_output():
  rng = np.random.default_rng(4)
  final = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  aux = rng.normal(size=(1, 4, 4, 2)).astype(np.float32)
  labels = rng.integers(0, 2, size=(1, 16, 16)).astype(np.uint8)
  outputs = {"logits": final, "aux": (aux,)}
  config = ml_collections.ConfigDict(
    dict(name="ce", weights=(1.0, 0.5), ohem_thresh=0.7, ohem_min_kept=100, dice_weight=0.0)
  )
  plain, _ = losses.segmentation_loss(outputs, labels, config)
  config.dice_weight = 2.0
  total, _ = losses.segmentation_loss(outputs, labels, config)
  up = lambda x: losses.resize_bilinear(x, (16, 16), align_corners=False)
  dice = float(losses.dice_loss(up(final), labels)) + 0.5 * float(losses.dice_loss(up(aux), labels))
  np.testing.assert_allclose(float(total), float(plain) + 2.0 * dice, rtol=1e-5)


def test_map_detection_loss_is_bce_on_the_top_share_of_the_margin():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(3, 5, 8, 2)).astype(np.float32) * 3
  image_labels = np.array([1, 0, 1])
  margin = (logits[..., 1] - logits[..., 0]).reshape(3, -1).astype(np.float64)
  k = 4  # round(0.1 * 40)
  score = np.sort(margin, axis=1)[:, -k:].mean(axis=1)
  prob = 1 / (1 + np.exp(-score))
  expected = -np.mean(np.where(image_labels == 1, np.log(prob), np.log(1 - prob)))
  got = float(losses.map_detection_loss(logits, image_labels, topk=0.1))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # An untouched image is punished by its highest pixels only: lowering one of them helps.
  quiet = np.zeros((1, 4, 4, 2), np.float32)
  loud = quiet.copy()
  loud[0, 0, 0, 1] = 6.0
  untouched = np.array([0])
  assert float(losses.map_detection_loss(loud, untouched, 1 / 16)) > float(
    losses.map_detection_loss(quiet, untouched, 1 / 16)
  )


def test_map_detection_weight_adds_its_term_through_the_task_loss():
  from miml_jax.tasks.segmentation import image_and_pixel_loss

  rng = np.random.default_rng(6)
  logits = rng.normal(size=(2, 4, 4, 2)).astype(np.float32)
  labels = np.zeros((2, 16, 16), np.uint8)
  labels[0, 2:6, 3:9] = 1  # The first image is tampered, the second untouched.
  config = ml_collections.ConfigDict(
    dict(name="ce", weights=(1.0,), ohem_thresh=0.7, ohem_min_kept=100, image_weight=0.0)
  )
  plain, _ = image_and_pixel_loss({"logits": logits}, labels, config)
  config.map_detection_weight = 0.5
  config.map_detection_topk = 0.25
  total, terms = image_and_pixel_loss({"logits": logits}, labels, config)
  term = float(losses.map_detection_loss(logits, np.array([1, 0]), 0.25))
  np.testing.assert_allclose(float(terms["loss_map_detection"]), term, rtol=1e-6)
  np.testing.assert_allclose(float(total), float(plain) + 0.5 * term, rtol=1e-5)
