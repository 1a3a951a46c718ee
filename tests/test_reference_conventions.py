"""Each named convention that claims a reference script equals that script on the same maps.

Every reference is restated here as a small, independent NumPy function that follows the
script's own steps (read with the search tool's fetch, not copied): TruFor's test_docker/metrics.py
(grip-unina/TruFor), the official MIML inference scripts (qcf-568/MIML, models for IML/
casia1_infer.py, imd_infer.py, and the threshold rule of mmseg/models/segmentors/
viz_encoder_decoder.py) and IMDLBenCo's pixel evaluators (scu-zjz/IMDLBenCo, IMDLBenCo/
evaluation/F1.py, IOU.py, AUC.py, averaged per image by training_scripts/tester/tester.py). The
maps are made where the conventions disagree: a scored region of one class, authentic images in
the set, values exactly 0.5, tied scores, an /imd path.
"""

import types
import warnings

import numpy as np
import pytest
import scipy.ndimage
from sklearn.metrics import confusion_matrix, roc_auc_score

from miml_jax import evaluate, metrics

# ---- Restatements of the reference scripts ---------------------------------------------------


def _trufor_f1(tp, fp, fn):
  # TruFor's computeF1(FP, TP, FN, TN) = 2 TP / max(2 TP + FN + FP, 1e-32).
  return 2 * tp / np.maximum(2 * tp + fn + fp, 1e-32)


def trufor_reference(values, gt):
  """(F1_best, F1_th) of TruFor's computeLocalizationMetrics on one map; NaN where it fails."""
  gt = np.asarray(gt, bool)
  positives = scipy.ndimage.minimum_filter(gt, 15)
  negatives = np.logical_not(scipy.ndimage.maximum_filter(gt, 11))
  try:
    v = values.ravel().astype(np.float32)
    neg, pos = negatives.ravel().astype(np.float32), positives.ravel().astype(np.float32)
    order = np.argsort(v)
    order = order[(neg[order] + pos[order]) > 0]
    v, neg, pos = v[order], neg[order], pos[order]
    tn, fn = np.cumsum(neg), np.cumsum(pos)
    fp, tp = np.sum(neg) - tn, np.sum(pos) - fn
    last = np.append(v[1:] > v[:-1], True)  # The last pixel of each run of equal values.
    tp, fp, fn, tn = tp[last], fp[last], fn[last], tn[last]
    best = max(np.max(_trufor_f1(tp, fp, fn)), np.max(_trufor_f1(fn, tn, tp)))
  except (IndexError, ValueError):
    best = np.nan
  try:
    scored = (negatives | positives).ravel()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      cm = confusion_matrix(
        gt.ravel()[scored].astype(np.uint8), (values > 0.5).ravel()[scored].astype(np.uint8)
      )
    tn, fn, fp, tp = cm[0, 0], cm[1, 0], cm[0, 1], cm[1, 1]
    fixed = max(_trufor_f1(tp, fp, fn), _trufor_f1(fn, tn, tp))
  except (IndexError, ValueError):
    fixed = np.nan
  return best, fixed


def miml_reference(items):
  """The official scripts' loop over every file: items are (path, grey mask, prob, cls_score or
  None). Returns the means (IoU, P, R, F1)."""
  ious, ps, rs, fs = [], [], [], []
  for path, mask, prob, cls_score in items:
    gt = (mask > 0).astype(np.uint8)
    if cls_score is not None and "/imd" not in path.lower():
      thres = np.clip(np.float32(1) - np.float32(cls_score), np.float32(0.3), np.float32(0.7))
    else:
      thres = np.float32(0.5)
    pred = (prob.astype(np.float32) > thres).astype(np.int64)
    i2 = (pred * gt).sum()
    psum, gsum = pred.sum(), gt.sum()
    u2 = psum + gsum - i2
    ious.append(i2 / (u2 + 1e-6))
    p, r = i2 / (psum + 1e-6), i2 / (gsum + 1e-6)
    ps.append(p)
    rs.append(r)
    fs.append(2 * p * r / (p + r + 1e-8))
  return tuple(float(np.array(x).mean()) for x in (ious, ps, rs, fs))


def _benco_f1(tp, tn, fp, fn):
  eps = np.float32(1e-8)
  precision = tp / (tp + fp + eps)
  recall = tp / (tp + fn + eps)
  return 2 * precision * recall / (precision + recall + eps)


def _benco_iou(predict, gt):
  predict = (predict > 0.5).astype(np.float32)
  intersection = np.sum(predict * gt, dtype=np.float32)
  union = np.sum(predict, dtype=np.float32) + np.sum(gt, dtype=np.float32) - intersection
  return intersection / (union + np.float32(1e-8))


def _benco_auc(gt, scores):
  y = gt.ravel()
  if np.sum(y) == 0:
    return 0.0
  y = y[np.argsort(-scores.ravel(), kind="stable")]  # Ties in raster order.
  n_pos = float(np.sum(y))
  n_neg = len(y) - n_pos
  with np.errstate(invalid="ignore", divide="ignore"):
    tpr, fpr = np.cumsum(y) / n_pos, np.cumsum(1 - y) / n_neg
  return float(np.trapezoid(tpr, fpr))


def benco_reference(items):
  """IMDLBenCo's PixelF1 / PixelIOU / PixelAUC over every image, 'origin' and 'double' modes:
  items are (grey mask, prob). Returns {mode: (F1, IoU, AUC)} as means over the images."""
  rows = {"origin": [], "double": []}
  for mask, prob in items:
    rgb = np.repeat(mask[:, :, None], 3, axis=2)  # The dataset reads the mask as RGB.
    gt = (np.mean(rgb, axis=2) > 127.5).astype(np.float32)
    predict = prob.astype(np.float32)
    binary = (predict > 0.5).astype(np.float32)
    tp = np.sum(binary * gt, dtype=np.float32)
    tn = np.sum((1 - binary) * (1 - gt), dtype=np.float32)
    fp = np.sum(binary * (1 - gt), dtype=np.float32)
    fn = np.sum((1 - binary) * gt, dtype=np.float32)
    f1 = _benco_f1(tp, tn, fp, fn)
    iou = _benco_iou(predict, gt)
    auc = _benco_auc(gt, predict)
    rows["origin"].append((f1, iou, auc))
    rows["double"].append(
      (
        max(f1, _benco_f1(fn, fp, tn, tp)),
        max(iou, _benco_iou(1 - predict, gt)),
        max(auc, _benco_auc(gt, 1 - predict)),
      )
    )
  return {mode: tuple(float(np.mean(c)) for c in zip(*r)) for mode, r in rows.items()}


# ---- Hand-made maps ----------------------------------------------------------------------------


def _square(size=64, lo=16, hi=48):
  gt = np.zeros((size, size), bool)
  gt[lo:hi, lo:hi] = True
  return gt


def _trufor_cases():
  rng = np.random.default_rng(0)
  perfect = _square()
  thin = np.zeros((64, 64), bool)
  thin[20:44, 30:33] = True  # 3 px wide: no pixel survives the 15 x 15 erosion.
  tiny = np.zeros((9, 9), bool)
  tiny[4, 4] = True  # The 11 x 11 dilation covers the image: no pixel is scored at all.
  full = np.ones((32, 32), bool)  # Only positives are scored.
  cases = [
    ("perfect", perfect.astype(np.float32), perfect),
    ("thin, silent", np.full((64, 64), 0.1, np.float32), thin),
    ("thin, false alarm", np.where(_square(64, 2, 10), 0.9, 0.1).astype(np.float32), thin),
    ("nothing scored", np.full((9, 9), 0.7, np.float32), tiny),
    ("all positive, found", np.full((32, 32), 0.9, np.float32), full),
    ("all positive, missed", np.full((32, 32), 0.2, np.float32), full),
  ]
  for k in range(6):
    gt = scipy.ndimage.gaussian_filter(rng.random((48, 56)), 4) > 0.5
    prob = np.round(rng.random((48, 56)) * 0.6 + 0.3 * gt, 1).astype(np.float32)  # Ties.
    cases.append((f"random {k}", prob, gt))
  return cases


def test_trufor_conventions_equal_trufors_script():
  cases = _trufor_cases()
  references = np.array([trufor_reference(prob, gt) for _, prob, gt in cases], np.float64)
  scores = evaluate.ConventionScores(("trufor_fixed_0.5", "trufor_best"))
  for label, prob, gt in cases:
    scores.add(prob, gt, label)
  summary = scores.summary()
  # TruFor's np.nanmean drops the images where its script gave NaN.
  assert summary["trufor_fixed_0.5"]["f1"] == pytest.approx(np.nanmean(references[:, 1]), abs=1e-7)
  assert summary["trufor_best"]["f1"] == pytest.approx(np.nanmean(references[:, 0]), abs=1e-7)
  # nothing scored (best); thin silent, nothing scored, all positive found (fixed).
  assert summary["trufor_best"]["num_nan"] == 1
  assert summary["trufor_fixed_0.5"]["num_nan"] == 3
  assert summary["trufor_best"]["num_images"] == len(cases)
  scores = evaluate.ConventionScores(("trufor_band_fixed_0.5", "trufor_band_best"))
  for label, prob, gt in cases:
    scores.add(prob, gt, label)
  summary = scores.summary()
  # Under their own names, the band conventions score those images 0 or 1 and keep them all.
  band = references.copy()
  band[[1, 3], 1] = 0  # thin silent, nothing scored: 0; all positive found: 1.
  band[4, 1] = 1
  band[3, 0] = 0
  for name, column in (("trufor_band_best", 0), ("trufor_band_fixed_0.5", 1)):
    empty = sum(not metrics.border_band(gt)[1].any() for _, _, gt in cases)
    assert summary[name]["num_band_empty"] == empty and summary[name]["num_images"] == len(cases)
    assert summary[name]["f1"] == pytest.approx(band[:, column].mean(), abs=1e-5)
  # Image by image, NaN where the script gives NaN.
  for label, prob, gt in cases:
    best, fixed = trufor_reference(prob, gt)
    ours = metrics.trufor_scores(prob, gt)
    for name, want, got in (("best", best, ours["f1_best"]), ("fixed", fixed, ours["f1_fixed"])):
      if np.isnan(want):
        assert np.isnan(got), (label, name, got)
      else:
        assert got == pytest.approx(float(want), abs=1e-7), (label, name)


def test_trufor_f1_only_and_nan_summary():
  scores = evaluate.ConventionScores(("trufor_fixed_0.5", "trufor_best"))
  tiny = np.zeros((9, 9), bool)
  tiny[4, 4] = True
  scores.add(np.full((9, 9), 0.7, np.float32), tiny, "nothing scored")
  summary = scores.summary()
  for name in ("trufor_fixed_0.5", "trufor_best"):
    assert np.isnan(summary[name]["f1"]) and summary[name]["num_nan"] == 1
    assert np.isnan(summary[name]["iou"])  # The script reports F1 only.


def _config(policy="image_head"):
  return types.SimpleNamespace(
    eval=types.SimpleNamespace(
      threshold_policy=policy, threshold=0.5, conventions="all", num_pictures=0
    )
  )


class _Maps:
  """A stand-in for the Predictor: fixed (sample, map, image score) triples."""

  resize = "none"

  def __init__(self, items):
    self.items = items

  def predict(self, source, limit=None):
    for sample, prob, image_prob in self.items:
      yield sample, {"prob": prob, "image_score": image_prob}


def _miml_items(image_prob):
  gt = _square()
  mask = np.where(gt, 255, 0).astype(np.uint8)
  weak = np.where(gt, 0.45, 0.2).astype(np.float32)  # Found at t = 0.3, missed at 0.5.
  return [
    ("data/CASIA1/imgs/a.jpg", mask, weak, image_prob),
    ("data/IMD2020/imgs/b.jpg", mask, weak, image_prob),  # Official: t = 0.5 for '/imd'.
    ("data/CASIA1/imgs/c.jpg", np.zeros_like(mask), np.full_like(weak, 0.2), image_prob),
    ("data/CASIA1/imgs/d.jpg", mask, np.where(gt, 0.9, 0.6).astype(np.float32), image_prob),
  ]


@pytest.mark.parametrize("image_prob", [0.8, 0.35, float("nan")])
def test_miml_official_equals_the_official_scripts(image_prob):
  items = _miml_items(image_prob)
  predictor = _Maps(
    [
      ({"id": path.split("/", 2)[2], "path": path, "mask": mask, "image": None}, prob, p)
      for path, mask, prob, p in items
    ]
  )
  policy = "fixed" if np.isnan(image_prob) else "image_head"
  result = evaluate.evaluate(predictor, _config(policy), source=None, conventions="all")
  head = None if np.isnan(image_prob) else image_prob
  want = miml_reference([(path, mask, prob, head) for path, mask, prob, _ in items])
  official = result["conventions"]["miml_official"]
  got = tuple(official[k] for k in ("iou", "precision", "recall", "f1"))
  assert got == pytest.approx(want, abs=1e-12)
  assert official["num_images"] == 4 and official["num_authentic"] == 1
  assert official["num_imd_path"] == 1
  # The headline keeps scoring manipulated images only, at its own threshold policy.
  assert result["summary"]["num_images"] == 3 and result["num_authentic_skipped"] == 1
  if image_prob == 0.8:  # t = 0.3: the headline finds b; the official rule scores it at 0.5.
    assert result["summary"]["f1"] == pytest.approx((1 + 1 + 0.4) / 3, abs=1e-6)
    assert official["f1"] == pytest.approx((1 + 0 + 0 + 0.4) / 4, abs=1e-6)


def test_miml_official_threshold_rule():
  assert metrics.miml_official_threshold("x/imgs/a.png", 0.9) == pytest.approx(0.3)
  assert metrics.miml_official_threshold("test_datas/IMD20/imgs/a.png", 0.9) == 0.5
  assert metrics.miml_official_threshold("IMD20/imgs/a.png", 0.9) == pytest.approx(0.3)
  assert metrics.miml_official_threshold("x/a.png", float("nan")) == 0.5
  assert metrics.miml_official_threshold("x/a.png", 0.0) == pytest.approx(0.7)


def _benco_items():
  rng = np.random.default_rng(4)
  gt = _square(32, 8, 24)
  faint = np.where(gt, 255, 0).astype(np.uint8)
  faint[2:6, 2:6] = 100  # Tampered for MIML (> 0), not for IMDLBenCo (RGB mean > 127.5).
  half = np.where(gt, 0.5, 0.0).astype(np.float32)  # Exactly 0.5 on the forgery.
  ties = np.full((32, 32), 0.5, np.float32)  # One tied score: AUC by raster order.
  top = np.zeros((32, 32), np.uint8)
  top[:8] = 255  # Tampered rows first in raster order.
  items = [
    (faint, half),
    (np.zeros((32, 32), np.uint8), np.full((32, 32), 0.3, np.float32)),  # Authentic.
    (top, ties),
    (np.where(gt, 255, 0).astype(np.uint8), np.where(gt, 0.2, 0.7).astype(np.float32)),
  ]
  for _ in range(4):
    mask = np.where(scipy.ndimage.gaussian_filter(rng.random((24, 30)), 3) > 0.5, 255, 0)
    prob = np.round(rng.random((24, 30)), 1).astype(np.float32)
    items.append((mask.astype(np.uint8), prob))
  return items


def test_imdlbenco_conventions_equal_imdlbencos_evaluators():
  items = _benco_items()
  scores = evaluate.ConventionScores(("imdlbenco", "imdlbenco_double"))
  for k, (mask, prob) in enumerate(items):
    scores.add(prob, mask, f"image {k}")
  summary = scores.summary()
  want = benco_reference(items)
  for name, mode in (("imdlbenco", "origin"), ("imdlbenco_double", "double")):
    got = (summary[name]["f1"], summary[name]["iou"], summary[name]["pixel_auc"])
    assert got == pytest.approx(want[mode], abs=1e-6), name
    assert summary[name]["num_images"] == len(items)
    assert summary[name]["num_authentic"] == 1


def test_imdlbenco_edge_cases():
  items = _benco_items()
  half_mask, half = items[0]
  one = metrics.imdlbenco_scores(half, half_mask > 127.5)
  # prob exactly 0.5: the F1 double mode inverts the binary map (0.5 -> positive), the IoU
  # double mode thresholds 1 - map (0.5 stays negative): the two disagree.
  assert one["f1"] == 0 and one["f1_double"] > 0.3
  assert one["iou"] == 0 and one["iou_double"] == 0
  # An authentic image scores 0 under every IMDLBenCo number, AUC included.
  authentic = metrics.imdlbenco_scores(items[1][1], items[1][0] > 127.5)
  assert all(value == 0 for value in authentic.values())
  # Tied scores are not grouped: a constant map ranks the (first, raster-order) positives on top.
  tie_mask, ties = items[2]
  assert metrics.imdlbenco_scores(ties, tie_mask > 127.5)["auc"] == 1.0
  assert roc_auc_score((tie_mask > 127.5).ravel(), ties.ravel()) == 0.5
  assert metrics.pixel_auc(ties, tie_mask) == 0.5  # The headline groups ties, as sklearn.
  # No tie: the ranked AUC is sklearn's.
  rng = np.random.default_rng(5)
  gt, prob = rng.random(500) > 0.6, rng.random(500).astype(np.float32)
  assert metrics.ranked_auc(prob, gt) == pytest.approx(roc_auc_score(gt, prob), abs=1e-12)
  assert np.isnan(metrics.ranked_auc(prob, np.ones(500, bool)))  # FPR = 0 / 0 there.


def test_every_image_conventions_see_authentic_images_through_evaluate():
  items = _benco_items()
  predictor = _Maps(
    [
      ({"id": f"{k}.png", "mask": m, "image": None}, p, float("nan"))
      for k, (m, p) in enumerate(items)
    ]
  )
  result = evaluate.evaluate(
    predictor, _config("fixed"), source=None, conventions="imdlbenco,imdlbenco_double,fixed_0.5"
  )
  want = benco_reference(items)
  got = result["conventions"]["imdlbenco"]
  assert (got["f1"], got["iou"], got["pixel_auc"]) == pytest.approx(want["origin"], abs=1e-6)
  assert got["num_images"] == len(items)
  # The others stay on the manipulated images (mask > 0), as the headline.
  assert result["conventions"]["fixed_0.5"]["num_images"] == result["summary"]["num_images"]
  assert result["summary"]["num_images"] == len(items) - 1
