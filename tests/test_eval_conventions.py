"""The evaluation conventions of docs/evaluation.md on hand-made cases where they disagree (so a
mix-up fails a test), each checked against an independent reference: scipy's filters for TruFor's
band, brute force over thresholds for the oracle, sklearn for AUC and balanced accuracy."""

import numpy as np
import pytest
import scipy.ndimage
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from miml_jax import evaluate, metrics, perturb
from miml_jax.errors import UserInputError


def _square(size=64, lo=16, hi=48):
  gt = np.zeros((size, size), bool)
  gt[lo:hi, lo:hi] = True
  return gt


def _sklearn_f1(prob, gt, threshold, valid=None):
  keep = np.ones_like(gt) if valid is None else valid
  return f1_score(gt[keep].ravel(), (prob > threshold)[keep].ravel(), zero_division=0)


def test_inverted_map_only_counts_under_the_inverse_conventions():
  gt = _square()
  prob = np.where(gt, 0.1, 0.9).astype(np.float32)  # Right region, wrong polarity.
  scores = evaluate.ConventionScores(evaluate.CONVENTIONS)
  scores.add(prob, gt, "inverted")
  summary = scores.summary()
  assert summary["fixed_0.5"]["f1"] == 0.0
  assert summary["best_per_image_inverse"]["f1"] == pytest.approx(1.0, abs=1e-6)
  assert summary["best_per_image_inverse"]["inverted_fraction"] == 1.0
  assert summary["trufor_fixed_0.5"]["f1"] == pytest.approx(1.0, abs=1e-6)
  assert summary["trufor_best"]["f1"] == pytest.approx(1.0, abs=1e-6)
  assert summary["trufor_band_fixed_0.5"]["f1"] == pytest.approx(1.0, abs=1e-6)
  assert summary["trufor_band_best"]["inverted_fraction"] == 1.0
  assert summary["imdlbenco"]["f1"] == 0.0 and summary["imdlbenco_double"]["f1"] == pytest.approx(1)
  assert summary["miml_official"]["f1"] == 0.0
  # Without the inverse the best the oracle can do is predict everything.
  everything = 2 * gt.mean() / (1 + gt.mean())
  assert summary["best_per_image"]["f1"] == pytest.approx(everything, abs=1e-6)


def test_low_amplitude_map_scores_only_with_the_oracle():
  gt = _square()
  prob = np.where(gt, 0.3, 0.1)
  fixed = metrics.fixed_threshold_scores(prob, gt, 0.5)
  best = metrics.best_threshold_scores(prob, gt)
  assert fixed["f1"] == 0.0 and best["f1"] == pytest.approx(1.0, abs=1e-6)
  assert best["threshold"] == pytest.approx(0.1) and not best["inverted"]


def test_border_band_forgives_boundary_errors_and_matches_scipy():
  gt = _square()
  # A prediction 3 px too large on every side: wrong only inside the band TruFor ignores.
  prob = _square(lo=13, hi=51).astype(np.float64)
  valid, positives = metrics.border_band(gt)
  assert _sklearn_f1(prob, gt, 0.5) < 0.85
  assert metrics.fixed_threshold_scores(prob, positives, 0.5, valid=valid)["f1"] == pytest.approx(
    1.0, abs=1e-6
  )
  rng = np.random.default_rng(0)
  for _ in range(10):
    blobs = scipy.ndimage.gaussian_filter(rng.random((40, 50)), 3) > 0.5
    for erode, dilate in ((15, 11), (3, 5), (1, 1)):
      valid, positives = metrics.border_band(blobs, erode, dilate)
      want_pos = scipy.ndimage.minimum_filter(blobs.astype(np.uint8), erode).astype(bool)
      want_neg = ~scipy.ndimage.maximum_filter(blobs.astype(np.uint8), dilate).astype(bool)
      np.testing.assert_array_equal(positives, want_pos)
      np.testing.assert_array_equal(valid, want_pos | want_neg)
  with pytest.raises(UserInputError, match="odd"):
    metrics.border_band(gt, 14, 11)


def test_best_threshold_is_the_brute_force_maximum():
  rng = np.random.default_rng(1)
  for _ in range(20):
    gt = rng.random((12, 17)) > rng.uniform(0.3, 0.9)
    prob = np.round(rng.random((12, 17)), 1)  # Ties: thresholds sit between distinct values.
    candidates = [*np.unique(prob), -1.0]
    brute = max(_sklearn_f1(prob, gt, t) for t in candidates)
    best = metrics.best_threshold_scores(prob, gt)
    assert best["f1"] == pytest.approx(brute, abs=1e-5)
    assert _sklearn_f1(prob, gt, best["threshold"]) == pytest.approx(best["f1"], abs=1e-5)
    brute_inverse = max(
      brute, *(f1_score(gt.ravel(), (prob <= t).ravel(), zero_division=0) for t in candidates)
    )
    assert metrics.best_threshold_scores(prob, gt, inverse=True)["f1"] == pytest.approx(
      brute_inverse, abs=1e-5
    )
    # IoU at the best-F1 threshold is the best IoU too (IoU = F1 / (2 - F1)).
    assert best["iou"] == pytest.approx(best["f1"] / (2 - best["f1"]), abs=1e-5)


def test_pooled_and_per_image_disagree_as_they_should():
  accumulator = metrics.MetricAccumulator()
  big = _square(64, 0, 64)
  accumulator.add(big.astype(np.float32), big)  # Perfect on 4096 tampered pixels.
  small = _square(16, 4, 8)
  accumulator.add(np.zeros((16, 16), np.float32), small)  # Misses 16 pixels.
  summary = accumulator.summary()
  assert summary["f1"] == pytest.approx(0.5, abs=1e-6)
  assert summary["pooled_f1"] == pytest.approx(2 * 4096 / (2 * 4096 + 16), abs=1e-6)
  # Pixel AUC: each image ranks its own pixels perfectly, but the scales differ between them.
  accumulator = metrics.MetricAccumulator()
  gt = _square(8, 2, 6)
  accumulator.add(np.where(gt, 0.9, 0.8), gt)
  accumulator.add(np.where(gt, 0.2, 0.1), gt)
  summary = accumulator.summary()
  assert summary["pixel_auc"] == 1.0
  pooled_gt = np.r_[gt.ravel(), gt.ravel()]
  pooled_prob = np.r_[np.where(gt, 0.9, 0.8).ravel(), np.where(gt, 0.2, 0.1).ravel()]
  assert summary["pixel_auc_pooled"] == pytest.approx(
    roc_auc_score(pooled_gt, pooled_prob), abs=1e-9
  )
  assert summary["pixel_auc_pooled"] < 0.8
  curves = accumulator.pooled_curves()
  assert curves["recall"][0] == 0 and curves["recall"][-1] == 1
  assert curves["precision"][-1] == pytest.approx(gt.mean())


def test_image_level_detection_matches_sklearn():
  rng = np.random.default_rng(2)
  scores = rng.random(40)
  labels = rng.random(40) > 0.4
  result = metrics.detection_scores(scores, labels)
  assert result["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
  assert result["balanced_accuracy"] == pytest.approx(
    balanced_accuracy_score(labels, scores > 0.5), abs=1e-12
  )
  assert result["accuracy"] == pytest.approx(np.mean((scores > 0.5) == labels))
  # Accuracy and balanced accuracy disagree on unbalanced data: all-"manipulated" on 9:1.
  unbalanced = metrics.detection_scores(np.ones(10), np.r_[np.ones(9), 0])
  assert unbalanced["accuracy"] == 0.9 and unbalanced["balanced_accuracy"] == 0.5
  assert np.isnan(metrics.detection_scores(np.ones(3), np.ones(3))["auc"])


def test_convention_names_are_checked():
  assert evaluate.parse_conventions("all") == tuple(evaluate.CONVENTIONS)
  assert evaluate.parse_conventions("none") == ()
  assert evaluate.parse_conventions("trufor_best,fixed_0.5") == ("trufor_best", "fixed_0.5")
  with pytest.raises(UserInputError, match="unknown f1_magic"):
    evaluate.parse_conventions("f1_magic")


def test_perturbations():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  mask = np.zeros((40, 60), np.uint8)
  mask[10:20, 10:30] = 255
  assert perturb.parse(["jpeg:50,90", "blur:3", "resize:0.5"]) == [
    ("jpeg", 50),
    ("jpeg", 90),
    ("blur", 3),
    ("resize", 0.5),
  ]
  for bad, why in (
    ("jpeg:101", "quality"),
    ("blur:4", "odd"),
    ("sharpen:3", "KIND"),
    ("noise:x", "not a number"),
    ("resize:0", "scale"),
  ):
    with pytest.raises(UserInputError, match=why):
      perturb.parse([bad])
  low, _ = perturb.apply(image, mask, "jpeg", 30, seed=0)
  high, _ = perturb.apply(image, mask, "jpeg", 95, seed=0)
  assert np.abs(low.astype(int) - image).mean() > np.abs(high.astype(int) - image).mean() > 0
  blurred, same = perturb.apply(image, mask, "blur", 7, seed=0)
  assert blurred.std() < image.std() and same is mask
  noisy_a, _ = perturb.apply(image, mask, "noise", 10, seed=1)
  noisy_b, _ = perturb.apply(image, mask, "noise", 10, seed=1)
  np.testing.assert_array_equal(noisy_a, noisy_b)
  small_image, small_mask = perturb.apply(image, mask, "resize", 0.5, seed=0)
  assert small_image.shape == (20, 30, 3) and small_mask.shape == (20, 30)
  assert set(np.unique(small_mask)) == {0, 255}
