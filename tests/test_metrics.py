"""Tests for miml_jax.metrics: the MIML formulas by hand, pooling, padding, AUC against sklearn."""

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from miml_jax import metrics
from miml_jax.errors import UserInputError

# A 4x4 case counted by hand:
#   pred          gt
#   1 1 1 0       0 1 1 0
#   1 1 1 0       0 0 1 0
#   0 0 0 0       0 0 0 1
#   0 0 0 0       0 0 0 0
# |pred| = 6, |gt| = 4, I = 3 (the three gt pixels in the top-left 2x3 block), U = 6 + 4 - 3 = 7.
PRED_4X4 = np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
GT_4X4 = np.array([[0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], bool)
# tp = 3, fp = 6 - 3 = 3, fn = 4 - 3 = 1, tn = 16 - 7 = 9.
IOU_4X4 = 3 / (7 + 1e-6)  # 0.42857136...
P_4X4 = 3 / (6 + 1e-6)  # 0.49999992...
R_4X4 = 3 / (4 + 1e-6)  # 0.74999981...
F1_4X4 = 2 * P_4X4 * R_4X4 / (P_4X4 + R_4X4 + 1e-8)  # 0.59999987...


def test_hand_computed_4x4():
  scores = metrics.scores_from_counts(3.0, 3.0, 1.0)
  assert scores["iou"] == IOU_4X4 and scores["precision"] == P_4X4
  assert scores["recall"] == R_4X4 and scores["f1"] == F1_4X4
  # The epsilons move the numbers by about 1e-7, no more.
  assert scores["iou"] == pytest.approx(3 / 7, abs=1e-6)
  assert scores["f1"] == pytest.approx(0.6, abs=1e-6)

  acc = metrics.MetricAccumulator()
  # A soft map whose > 0.5 region is PRED_4X4; 0.5 itself is negative (strict threshold) and the
  # ground truth is given as 0/255, positive iff > 0.
  prob = np.where(PRED_4X4, 0.9, 0.5)
  acc.add(prob, GT_4X4.astype(np.uint8) * 255, name="a")
  (row,) = acc.per_image()
  assert row["name"] == "a"
  assert (row["iou"], row["precision"], row["recall"], row["f1"]) == (IOU_4X4, P_4X4, R_4X4, F1_4X4)
  # AUC: 3 positives at 0.9 and 1 at 0.5; 3 negatives at 0.9 and 9 at 0.5.
  # Positives at 0.9 beat 9 and tie 3: 3 * (9 + 1.5); the one at 0.5 ties 9: 4.5. Over 4 * 12.
  assert row["auc"] == pytest.approx((3 * 10.5 + 4.5) / 48, abs=1e-15)


def test_threshold_is_strict_and_per_image():
  prob = np.array([[0.3, 0.5, 0.7]])
  gt = np.array([[0, 1, 1]])
  acc = metrics.MetricAccumulator()
  acc.add(prob, gt, threshold=0.5)  # pred = [0, 0, 1]
  acc.add(prob, gt, threshold=0.3)  # pred = [0, 1, 1]
  first, second = acc.per_image()
  assert first["recall"] == pytest.approx(0.5, abs=1e-6)
  assert second["recall"] == pytest.approx(1.0, abs=1e-6)


def test_epsilon_edge_cases():
  empty = np.zeros((3, 3), bool)
  blob = np.zeros((3, 3), bool)
  blob[1, 1:] = True
  acc = metrics.MetricAccumulator()
  acc.add(empty.astype(float), blob, name="empty pred")
  acc.add(blob.astype(float), empty, name="empty gt")
  acc.add(empty.astype(float), empty, name="both empty")
  for row in acc.per_image():
    # Both empty is a perfect prediction, but the protocol's 0 / (0 + 1e-6) makes it 0.
    assert (row["iou"], row["precision"], row["recall"], row["f1"]) == (0.0, 0.0, 0.0, 0.0), row
  summary = acc.summary()
  assert summary["iou"] == summary["f1"] == summary["pooled_iou"] == 0.0
  # AUC is undefined with one class only: "empty gt" and "both empty".
  aucs = [row["auc"] for row in acc.per_image()]
  assert aucs[0] == 0.5 and math.isnan(aucs[1]) and math.isnan(aucs[2])
  assert summary["num_auc_undefined"] == 2 and summary["pixel_auc"] == 0.5
  scores = metrics.scores_from_counts(0.0, 0.0, 0.0)
  assert scores == {"iou": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_pooled_differs_from_mean():
  # Image A: 4 pixels, gt = pred = one pixel: IoU = 1 / (1 + 1e-6).
  # Image B: 16 pixels, gt = 8 pixels, pred = 2 of them: IoU = 2 / 8, P = 1, R = 1 / 4.
  gt_a = np.array([[1, 0], [0, 0]], bool)
  gt_b = np.zeros((4, 4), bool)
  gt_b[:2] = True
  pred_b = np.zeros((4, 4), bool)
  pred_b[0, :2] = True
  acc = metrics.MetricAccumulator()
  acc.add(gt_a.astype(float), gt_a)
  acc.add(pred_b.astype(float), gt_b)
  summary = acc.summary()
  assert summary["num_images"] == 2
  assert summary["iou"] == pytest.approx((1 + 0.25) / 2, abs=1e-6)  # 0.625
  assert summary["recall"] == pytest.approx((1 + 0.25) / 2, abs=1e-6)
  assert summary["precision"] == pytest.approx(1.0, abs=1e-6)
  # Pooled: I = 1 + 2 = 3, |pred| = 3, |gt| = 9, U = 9.
  assert summary["pooled_iou"] == 3 / (9 + 1e-6)
  assert summary["pooled_precision"] == 3 / (3 + 1e-6)
  assert summary["pooled_recall"] == 3 / (9 + 1e-6)
  p, r = 3 / (3 + 1e-6), 3 / (9 + 1e-6)
  assert summary["pooled_f1"] == 2 * p * r / (p + r + 1e-8)  # 0.5 vs a mean F1 of ~0.7
  assert summary["f1"] == pytest.approx((1 + 0.4) / 2, abs=1e-6)


def _random_case(rng, shape, levels=None):
  prob = rng.random(shape)
  if levels is not None:
    prob = np.round(prob * levels) / levels  # many ties
  gt = rng.random(shape) < np.clip(prob * 0.8 + 0.1, 0, 1)
  return prob, gt


def test_valid_mask_padding_invariance():
  rng = np.random.default_rng(3)
  plain, padded = metrics.MetricAccumulator(), metrics.MetricAccumulator()
  for shape in [(9, 13), (20, 7), (16, 16)]:
    prob, gt = _random_case(rng, shape, levels=10)
    plain.add(prob, gt, threshold=0.4)
    # Garbage in the padding (confident positives on positive gt) must not count.
    big_prob, big_gt = np.ones((24, 24)), np.ones((24, 24), bool)
    big_prob[3 : 3 + shape[0], 2 : 2 + shape[1]] = prob
    big_gt[3 : 3 + shape[0], 2 : 2 + shape[1]] = gt
    valid = np.zeros((24, 24), bool)
    valid[3 : 3 + shape[0], 2 : 2 + shape[1]] = True
    padded.add(big_prob, big_gt, threshold=0.4, valid=valid)
    assert metrics.pixel_auc(big_prob, big_gt, valid) == metrics.pixel_auc(prob, gt)
  assert plain.summary() == padded.summary()
  assert plain.per_image() == padded.per_image()


def test_pixel_auc_matches_sklearn_with_ties():
  rng = np.random.default_rng(5)
  for levels in (3, 20, None):
    prob, gt = _random_case(rng, (40, 50), levels)
    assert abs(metrics.pixel_auc(prob, gt) - roc_auc_score(gt.ravel(), prob.ravel())) < 1e-12
    valid = rng.random(prob.shape) < 0.7
    expected = roc_auc_score(gt[valid], prob[valid])
    assert abs(metrics.pixel_auc(prob, gt, valid) - expected) < 1e-12
  assert math.isnan(metrics.pixel_auc(prob, np.zeros_like(gt)))
  assert math.isnan(metrics.pixel_auc(prob, np.ones_like(gt)))


@settings(max_examples=30, deadline=None)
@given(hnp.arrays(np.int8, (6, 5), elements=st.integers(0, 4)), hnp.arrays(bool, (6, 5)))
def test_pixel_auc_property_vs_sklearn(levels, gt):
  prob = levels / 4.0
  if gt.all() or not gt.any():
    assert math.isnan(metrics.pixel_auc(prob, gt))
  else:
    assert abs(metrics.pixel_auc(prob, gt) - roc_auc_score(gt.ravel(), prob.ravel())) < 1e-12


def test_pooled_histogram_auc():
  rng = np.random.default_rng(6)
  num_bins = 100
  # Probabilities at bin centres are their own quantisation: the histogram AUC is sklearn's.
  quantised = metrics.MetricAccumulator(num_bins=num_bins)
  raw = metrics.MetricAccumulator()  # default 10,000 bins
  all_q, all_raw, all_gt = [], [], []
  for shape in [(30, 40), (25, 25), (10, 60)]:
    k = rng.integers(0, num_bins, size=shape)
    prob_q = (k + 0.5) / num_bins
    gt = rng.random(shape) < prob_q
    prob_raw, _ = _random_case(rng, shape)
    quantised.add(prob_q, gt)
    raw.add(prob_raw, gt)
    all_q.append(prob_q.ravel())
    all_raw.append(prob_raw.ravel())
    all_gt.append(gt.ravel())
  all_q, all_raw, all_gt = map(np.concatenate, (all_q, all_raw, all_gt))
  assert abs(quantised.summary()["pixel_auc_pooled"] - roc_auc_score(all_gt, all_q)) < 1e-12
  assert abs(raw.summary()["pixel_auc_pooled"] - roc_auc_score(all_gt, all_raw)) < 1e-3
  # Raw probabilities through a coarse histogram equal sklearn on floor(p * bins), with p = 1
  # in the last bin.
  edge_prob = np.concatenate([all_raw, [1.0, 0.0]])
  edge_gt = np.concatenate([all_gt, [True, False]])
  coarse = metrics.MetricAccumulator(num_bins=7)
  coarse.add(edge_prob[None], edge_gt[None])
  expected = roc_auc_score(edge_gt, np.minimum(np.floor(edge_prob * 7), 6))
  assert abs(coarse.summary()["pixel_auc_pooled"] - expected) < 1e-12


def test_summary_is_plain_json():
  rng = np.random.default_rng(7)
  acc = metrics.MetricAccumulator()
  probs = np.stack([_random_case(rng, (8, 8))[0] for _ in range(3)]).astype(np.float32)
  gts = probs > 0.6
  for prob, gt, threshold, name in zip(probs, gts, [0.5, 0.6, 0.7], ["x", "y", "z"]):
    acc.add(prob, gt, threshold=threshold, name=name)
  summary = acc.summary()
  assert set(summary) == {
    "num_images",
    "iou",
    "precision",
    "recall",
    "f1",
    "pooled_iou",
    "pooled_precision",
    "pooled_recall",
    "pooled_f1",
    "pixel_auc",
    "pixel_auc_pooled",
    "num_auc_undefined",
  }
  for key, value in summary.items():
    assert type(value) is (int if key.startswith("num_") else float), key
  assert summary["num_images"] == 3
  # gt = prob > 0.6 and prediction at 0.6: a perfect image; at 0.5 some false positives.
  rows = acc.per_image()
  assert [r["name"] for r in rows] == ["x", "y", "z"]
  assert rows[1]["iou"] == pytest.approx(1.0, abs=1e-6) and rows[0]["precision"] < 1.0
  assert all(r["auc"] == 1.0 for r in rows)
  for row in rows:
    assert all(type(row[k]) is float for k in ("iou", "precision", "recall", "f1", "auc"))
  json.loads(json.dumps({"summary": summary, "per_image": rows}))
  empty = metrics.MetricAccumulator().summary()
  assert empty["num_images"] == 0 and math.isnan(empty["iou"]) and math.isnan(empty["pixel_auc"])


def test_bad_input_names_the_image():
  acc = metrics.MetricAccumulator()
  with pytest.raises(UserInputError, match="img_7.png"):
    acc.add(np.full((4, 4), 255.0), np.zeros((4, 4)), name="img_7.png")
  with pytest.raises(UserInputError, match="img_8.png"):
    acc.add(np.full((4, 4), np.nan), np.zeros((4, 4)), name="img_8.png")
  with pytest.raises(UserInputError, match="image #0"):
    acc.add(np.zeros((4, 4)), np.zeros((4, 5)))
  # Out-of-range values in the padding are ignored.
  prob = np.full((4, 4), 7.0)
  prob[:2] = 0.9
  valid = np.zeros((4, 4), bool)
  valid[:2] = True
  acc.add(prob, np.ones((4, 4)), valid=valid)
  assert acc.summary()["num_images"] == 1
  assert acc.per_image()[0]["iou"] == pytest.approx(1.0, abs=1e-6)


def test_trivial_predictors():
  gt_a = np.zeros((4, 5), np.uint8)
  gt_a[:2, :2] = 255  # 4 of 20 pixels
  gt_b = np.zeros((2, 5), np.uint8)
  gt_b[0] = 1  # 5 of 10 pixels
  # The floor evaluate.py reports: constant maps scored at the default threshold.
  zero, one = metrics.MetricAccumulator(), metrics.MetricAccumulator()
  for gt in (gt_a, gt_b):
    zero.add(np.zeros(gt.shape), gt)
    one.add(np.ones(gt.shape), gt)
  zero, one = zero.summary(), one.summary()
  assert zero["iou"] == zero["f1"] == zero["pooled_f1"] == 0.0
  # All-one: IoU = P = area fraction per image; pooled over 9 of 30 pixels.
  assert one["iou"] == pytest.approx((4 / 20 + 5 / 10) / 2, abs=1e-6)
  assert one["precision"] == pytest.approx(0.35, abs=1e-6)
  assert one["recall"] == pytest.approx(1.0, abs=1e-6)
  assert one["pooled_iou"] == pytest.approx(9 / 30, abs=1e-6)
  for summary in (zero, one):
    assert summary["pixel_auc"] == 0.5 and summary["pixel_auc_pooled"] == 0.5
