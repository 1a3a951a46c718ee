"""Localisation metrics exactly as the MIML protocol writes them, plus pixel AUC.

The official MIML / Web-IML inference scripts binarise the map (`prob > threshold`, strict), take
ground truth as `mask > 0`, and per image compute

    I = |pred & gt|,  U = |pred| + |gt| - I
    IoU = I / (U + 1e-6),  P = I / (|pred| + 1e-6),  R = I / (|gt| + 1e-6),
    F1 = 2 P R / (P + R + 1e-8)

then average over images (the "mean" numbers). The epsilons are part of the protocol: an image
with an empty prediction and an empty ground truth gets IoU = P = R = F1 = 0, not 1. "Pooled"
numbers are the same formulas on counts summed over the dataset (one confusion matrix).

Pixel AUC comes per image (exact, with ties counted as 1/2 like sklearn's roc_auc_score) and
pooled over the dataset (from fixed-bin histograms, see `MetricAccumulator`).

Everything runs on the host in NumPy with exact integer counts: AUC needs a sort per image, and a
jitted count would recompile for every new image size.
"""

import math

import cv2
import numpy as np

from miml_jax.errors import UserInputError

# The protocol's epsilons (MIML casia1_infer.py and siblings).
IOU_EPS = 1e-6
F1_EPS = 1e-8
DEFAULT_THRESHOLD = 0.5
DEFAULT_NUM_BINS = 10000

_SCORE_KEYS = ("iou", "precision", "recall", "f1")
# The summary values where higher is better (what `train.best_metric` may name).
SUMMARY_SCORES = (
  *_SCORE_KEYS,
  *(f"pooled_{key}" for key in _SCORE_KEYS),
  "pixel_auc",
  "pixel_auc_pooled",
)


def _confusion(pred, gt, valid=None) -> tuple[int, int, int, int]:
  """tp, fp, fn, tn with the MIML rules, counted exactly (int64) on the valid pixels."""
  # pred is already binary in the protocol; `> 0` also accepts 0/1 ints and bools.
  pred = np.asarray(pred) > 0
  gt = np.asarray(gt) > 0
  neg_pred = ~pred
  neg_gt = ~gt
  cells = (pred & gt, pred & neg_gt, neg_pred & gt, neg_pred & neg_gt)
  if valid is not None:
    valid = np.asarray(valid, dtype=bool)
    cells = tuple(cell & valid for cell in cells)
  return tuple(int(np.sum(cell, dtype=np.int64)) for cell in cells)


def scores_from_counts(tp, fp, fn) -> dict:
  """IoU, precision, recall and F1 from counts, with the protocol's epsilons.

  Elementwise on Python numbers, NumPy or JAX arrays (plain arithmetic only). The official
  scripts compute in float64; pass float64 / Python numbers to match them to the last digit.
  U = |pred| + |gt| - I = tp + fp + fn.
  """
  iou = tp / (tp + fp + fn + IOU_EPS)
  precision = tp / (tp + fp + IOU_EPS)
  recall = tp / (tp + fn + IOU_EPS)
  f1 = 2 * precision * recall / (precision + recall + F1_EPS)
  return {"iou": iou, "precision": precision, "recall": recall, "f1": f1}


def _auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
  """ROC AUC from positive / negative counts per score level, levels in increasing order.

  Each positive beats the negatives on lower levels and ties (1/2) those on its own level: the
  Mann-Whitney statistic, which is what sklearn's trapezoidal ROC AUC equals with ties.
  """
  # float64 counts are exact up to 2^53 pixels and cannot overflow like int64 products of
  # pooled counts (positives x negatives) would on large datasets.
  pos = np.asarray(pos, dtype=np.float64)
  neg = np.asarray(neg, dtype=np.float64)
  num_pos, num_neg = pos.sum(), neg.sum()
  if num_pos == 0 or num_neg == 0:
    return math.nan
  neg_below = np.cumsum(neg) - neg
  return float(np.sum(pos * (neg_below + 0.5 * neg)) / (num_pos * num_neg))


def _auc_flat(prob: np.ndarray, gt: np.ndarray) -> float:
  """Exact AUC of 1-D scores `prob` against 1-D booleans `gt`: one sort, O(n log n)."""
  if gt.all() or not gt.any():
    return math.nan
  levels, level_of = np.unique(prob, return_inverse=True)
  pos = np.bincount(level_of[gt], minlength=levels.size)
  neg = np.bincount(level_of[~gt], minlength=levels.size)
  return _auc_from_histograms(pos, neg)


def pixel_auc(prob, gt, valid=None) -> float:
  """Exact pixel ROC AUC of one image, equal to sklearn.metrics.roc_auc_score (ties count 1/2).

  Args:
    prob: (H, W) scores.
    gt: (H, W) ground truth, positive iff > 0.
    valid: optional (H, W) boolean mask of the pixels to count.

  Returns:
    The AUC as a Python float; NaN when the counted ground truth is all 0 or all 1, where AUC is
    undefined (sklearn raises instead).
  """
  prob, gt = np.asarray(prob), np.asarray(gt) > 0
  if prob.shape != gt.shape:
    raise ValueError(f"prob has shape {prob.shape} but gt has shape {gt.shape}")
  if valid is not None:
    valid = np.asarray(valid, dtype=bool)
    if valid.shape != prob.shape:
      raise ValueError(f"valid has shape {valid.shape} but prob has shape {prob.shape}")
    return _auc_flat(prob[valid], gt[valid])
  return _auc_flat(prob.ravel(), gt.ravel())


def _bin_index(prob: np.ndarray, num_bins: int) -> np.ndarray:
  """Bin k holds [k / num_bins, (k + 1) / num_bins); p = 1.0 goes to the last bin."""
  scaled = np.asarray(prob, dtype=np.float64) * num_bins
  return np.minimum(scaled.astype(np.int64), num_bins - 1)


def _value_range(values: np.ndarray) -> str:
  """Describes bad values for an error message (nanmin would warn on an all-NaN array)."""
  finite = values[np.isfinite(values)]
  if finite.size < values.size:
    return f"{values.size - finite.size} non-finite values"
  return f"min {finite.min()}, max {finite.max()}"


def _mean(values: list[float]) -> float:
  return float(np.mean(values)) if values else math.nan


class MetricAccumulator:
  """Accumulates MIML localisation metrics over a dataset, one image at a time.

  Per image: IoU, precision, recall, F1 of `pred = prob > threshold` (strict `>`, as the official
  APSC-Net inference `output > thres`; a pixel at exactly the threshold is negative) and the
  exact pixel AUC. Over the dataset: pooled confusion counts and a pooled-AUC histogram.

  The pooled AUC is computed from `num_bins` equal bins over [0, 1] (positives and negatives
  counted separately, ties within a bin counted 1/2), so it equals sklearn's AUC on the
  probabilities quantised to floor(p * num_bins). With the default 10,000 bins it differs from the
  AUC of the raw probabilities only through pairs that fall into the same bin (well below 1e-3 in
  practice). Memory stays 2 x num_bins counts whatever the dataset size.

  `summary()` and `per_image()` return plain Python numbers, ready for json.dump. Undefined values
  are NaN (json writes them as NaN): the means of an empty accumulator, a per-image AUC when the
  ground truth is all 0 or all 1, the pooled AUC without positives or negatives.
  """

  def __init__(self, num_bins: int = DEFAULT_NUM_BINS):
    if num_bins < 1:
      raise ValueError(f"num_bins must be >= 1, got {num_bins}")
    self.num_bins = num_bins
    self._pos_hist = np.zeros(num_bins, np.int64)
    self._neg_hist = np.zeros(num_bins, np.int64)
    # Python ints: exact whatever the dataset size.
    self._tp = self._fp = self._fn = self._tn = 0
    self._rows: list[dict] = []

  def add(
    self, prob, gt, threshold: float = DEFAULT_THRESHOLD, valid=None, name: str | None = None
  ):
    """Adds one image.

    Args:
      prob: (H, W) probabilities of "manipulated", in [0, 1].
      gt: (H, W) ground truth, positive iff > 0 (bool, 0/1 or 0/255 all work).
      threshold: pred = prob > threshold. MIML uses clamp(1 - p_image_tampered, 0.3, 0.7) per
        image, or a fixed 0.5.
      valid: optional (H, W) boolean mask of the pixels to count (padding is False).
      name: kept in `per_image()` and used in error messages.

    Returns:
      This image's row of `per_image()`.

    Raises:
      UserInputError: naming the image, when shapes disagree or prob has values outside [0, 1]
        or non-finite values on counted pixels.
    """
    label = name if name is not None else f"image #{len(self._rows)}"
    prob, gt = np.asarray(prob), np.asarray(gt)
    if prob.ndim != 2 or prob.shape != gt.shape:
      raise UserInputError(
        f"{label}: expected prob and gt of one (H, W) shape, got {prob.shape} and {gt.shape}"
      )
    if valid is not None:
      valid = np.asarray(valid, dtype=bool)
      if valid.shape != prob.shape:
        raise UserInputError(f"{label}: valid has shape {valid.shape}, prob {prob.shape}")
      prob, gt = prob[valid], gt[valid]
    else:
      prob, gt = prob.ravel(), gt.ravel()
    gt = gt > 0
    if prob.size and not (np.all(np.isfinite(prob)) and prob.min() >= 0 and prob.max() <= 1):
      raise UserInputError(
        f"{label}: probabilities must be finite and within [0, 1], got {_value_range(prob)} "
        "(a 0..255 map must be divided by 255 first)"
      )

    tp, fp, fn, tn = _confusion(prob > threshold, gt)
    self._tp += tp
    self._fp += fp
    self._fn += fn
    self._tn += tn
    bins = _bin_index(prob, self.num_bins)
    self._pos_hist += np.bincount(bins[gt], minlength=self.num_bins)
    self._neg_hist += np.bincount(bins[~gt], minlength=self.num_bins)

    # Python floats, i.e. float64, as the official scripts compute.
    row = {"name": name}
    scores = scores_from_counts(float(tp), float(fp), float(fn))
    row.update({key: float(value) for key, value in scores.items()})
    row["auc"] = pixel_auc(prob, gt)
    self._rows.append(row)
    return dict(row)

  def summary(self) -> dict:
    """The dataset numbers, as plain Python numbers.

    Keys: num_images; iou, precision, recall, f1 (means over images); pooled_iou,
    pooled_precision, pooled_recall, pooled_f1 (one confusion matrix); pixel_auc (mean over the
    images whose AUC is defined); pixel_auc_pooled (histogram AUC); num_auc_undefined (images
    skipped in pixel_auc because their ground truth is all 0 or all 1).
    """
    pooled = scores_from_counts(float(self._tp), float(self._fp), float(self._fn))
    aucs = [row["auc"] for row in self._rows if not math.isnan(row["auc"])]
    result = {"num_images": len(self._rows)}
    for key in _SCORE_KEYS:
      result[key] = _mean([row[key] for row in self._rows])
    for key in _SCORE_KEYS:
      result[f"pooled_{key}"] = float(pooled[key])
    result["pixel_auc"] = _mean(aucs)
    result["pixel_auc_pooled"] = _auc_from_histograms(self._pos_hist, self._neg_hist)
    result["num_auc_undefined"] = len(self._rows) - len(aucs)
    return result

  def per_image(self) -> list[dict]:
    """One dict per added image: name, iou, precision, recall, f1, auc (NaN if undefined)."""
    return [dict(row) for row in self._rows]

  def pooled_curves(self) -> dict:
    """Pooled pixel precision-recall and ROC curves from the AUC histograms.

    Point k predicts the pixels whose probability falls in bin k or above (prob >= k / num_bins,
    up to the bins' quantisation), k = num_bins .. 0, so recall grows along the arrays.
    Returns {'threshold', 'precision', 'recall', 'fpr'} as float64 arrays.
    """
    tp = np.cumsum(self._pos_hist[::-1])[::-1].astype(np.float64)
    fp = np.cumsum(self._neg_hist[::-1])[::-1].astype(np.float64)
    tp, fp = np.r_[tp, 0.0][::-1], np.r_[fp, 0.0][::-1]
    num_pos, num_neg = max(tp[-1], 1.0), max(fp[-1], 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
      precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
    return {
      "threshold": np.arange(self.num_bins, -1, -1) / self.num_bins,
      "precision": precision,
      "recall": tp / num_pos,
      "fpr": fp / num_neg,
    }


# ---- Other conventions (docs/evaluation.md) ----------------------------------------------------
# Third-party papers score the same maps differently; each rule below is one named convention,
# reported under its own name by evaluate.py and never folded into the protocol's numbers.


def border_band(gt, erode: int = 15, dilate: int = 11) -> tuple[np.ndarray, np.ndarray]:
  """TruFor's exclusion of the uncertain band around mask boundaries.

  Positives that count are the ground truth eroded by an `erode` x `erode` square; negatives that
  count lie outside the ground truth dilated by a `dilate` x `dilate` square; pixels between are
  not scored. Borders reflect (scipy.ndimage's minimum/maximum_filter default, which TruFor's
  scoring script uses).

  Returns:
    (valid, positives): boolean (H, W) arrays; `positives` is the eroded ground truth.
  """
  for name, size in (("erode", erode), ("dilate", dilate)):
    if size < 1 or size % 2 == 0:
      raise UserInputError(f"border band: {name} size must be odd and >= 1, got {size}")
  gt = (np.asarray(gt) > 0).astype(np.uint8)
  positives = cv2.erode(
    gt, np.ones((erode, erode), np.uint8), borderType=cv2.BORDER_REFLECT
  ).astype(bool)
  negatives = ~cv2.dilate(
    gt, np.ones((dilate, dilate), np.uint8), borderType=cv2.BORDER_REFLECT
  ).astype(bool)
  return positives | negatives, positives


def threshold_sweep(scores, positive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every threshold at once, from one sort: (tp, fp, thresholds), float64 arrays where entry k
  counts the positives / negatives with score > thresholds[k]. Entry 0 predicts nothing
  (threshold = the maximum), the last everything (just below the minimum); in between, one
  entry per distinct score. ROC and PR curves and the per-image oracle all read this."""
  scores, positive = np.asarray(scores, np.float64).ravel(), np.asarray(positive, bool).ravel()
  order = np.argsort(-scores, kind="stable")
  values, positive = scores[order], positive[order]
  # Cutting after position i predicts every score >= values[i]; only the last position of a run
  # of equal values is a valid cut.
  ends = np.flatnonzero(np.r_[values[1:] < values[:-1], True])
  tp = np.r_[0, np.cumsum(positive)[ends]].astype(np.float64)
  fp = np.r_[0, np.cumsum(~positive)[ends]].astype(np.float64)
  thresholds = np.r_[values[0], values[ends[:-1] + 1], np.nextafter(values[-1], -np.inf)]
  return tp, fp, thresholds


def best_threshold_scores(prob, gt, valid=None, inverse: bool = False) -> dict:
  """Per-image "oracle" scores: IoU / P / R / F1 at the threshold that maximises F1 on this image.

  Every threshold is tried (pred = prob > t for each distinct value, and all-positive), exactly,
  from one sort. IoU = F1 / (2 - F1) on counts, so the same threshold maximises both. With
  `inverse`, the complement (1 - map) competes too and the better of the two is kept, as TruFor
  scores maps whose polarity a model may have learnt either way. Formulas are the protocol's
  (`scores_from_counts`).

  Returns:
    {'iou', 'precision', 'recall', 'f1', 'threshold', 'inverted'}: Python numbers; threshold t
    means pred = prob > t (for the inverted map, pred = prob <= t).
  """
  plain, either = oracle_scores(prob, gt, valid)
  return either if inverse else plain


def oracle_scores(prob, gt, valid=None) -> tuple[dict, dict]:
  """best_threshold_scores without and with `inverse`, from one sort (what evaluate.py needs)."""
  prob, gt = np.asarray(prob, np.float64), np.asarray(gt) > 0
  if valid is not None:
    valid = np.asarray(valid, bool)
    prob, gt = prob[valid], gt[valid]
  if prob.size == 0:
    empty = {
      "iou": 0.0,
      "precision": 0.0,
      "recall": 0.0,
      "f1": 0.0,
      "threshold": math.nan,
      "inverted": False,
    }
    return empty, dict(empty)
  tp, fp, thresholds = threshold_sweep(prob, gt)
  fn, tn = float(gt.sum()) - tp, float((~gt).sum()) - fp

  def best(scores, inverted):
    k = int(np.argmax(scores["f1"]))
    return dict(
      {key: float(value[k]) for key, value in scores.items()},
      threshold=float(thresholds[k]),
      inverted=inverted,
    )

  plain = best(scores_from_counts(tp, fp, fn), False)
  # The complement predicts what the map leaves out: tp <-> fn, fp <-> tn.
  flipped = best(scores_from_counts(fn, tn, tp), True)
  return plain, (flipped if flipped["f1"] > plain["f1"] else plain)


def fixed_threshold_scores(prob, gt, threshold: float, valid=None, inverse: bool = False) -> dict:
  """IoU / P / R / F1 of prob > threshold on the valid pixels; with `inverse`, the better of the
  map and its complement (TruFor's fixed-threshold F1)."""
  tp, fp, fn, tn = (float(c) for c in _confusion(np.asarray(prob) > threshold, gt, valid))
  best = dict(scores_from_counts(tp, fp, fn), inverted=False)
  if inverse:
    flipped = scores_from_counts(fn, tn, tp)
    if flipped["f1"] > best["f1"]:
      best = dict(flipped, inverted=True)
  return best


def detection_scores(scores, labels, threshold: float = 0.5) -> dict:
  """Image-level detection: ROC AUC (ties 1/2, as sklearn), accuracy and balanced accuracy of
  score > threshold, with label 1 = manipulated. NaN where a class is missing."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  if scores.shape != labels.shape or scores.ndim != 1:
    raise ValueError(
      f"scores {scores.shape} and labels {labels.shape}: expected two 1-D arrays of one length"
    )
  if not np.all(np.isfinite(scores)):
    raise UserInputError(f"image scores: {_value_range(scores)}")
  pred = scores > threshold
  tpr = float(np.mean(pred[labels])) if labels.any() else math.nan
  tnr = float(np.mean(~pred[~labels])) if (~labels).any() else math.nan
  return {
    "auc": _auc_flat(scores, labels) if scores.size else math.nan,
    "accuracy": float(np.mean(pred == labels)) if scores.size else math.nan,
    "balanced_accuracy": (tpr + tnr) / 2,
    "tpr": tpr,
    "tnr": tnr,
    "num_manipulated": int(labels.sum()),
    "num_authentic": int((~labels).sum()),
    "threshold": float(threshold),
  }


# ---- Reference scripts, restated (docs/evaluation.md#other-conventions) -----------------------
# Each function below computes what one public evaluation script computes on one image, with that
# script's own edge cases, so that its named convention equals the script on the same maps.

TRUFOR_NO_DIVISION = 1e-32  # TruFor's computeF1: 2TP / max(2TP + FN + FP, 1e-32)


def trufor_scores(prob, gt, erode: int = 15, dilate: int = 11, band=None) -> dict:
  """TruFor's `computeLocalizationMetrics` (grip-unina/TruFor, test_docker/metrics.py) on one
  image: its best-threshold and fixed-0.5 F1, each the better of the map and its complement.

  Both are scored on TruFor's band (`border_band`): positives = gt eroded by erode x erode,
  negatives = outside gt dilated by dilate x dilate. F1 = 2TP / max(2TP + FN + FP, 1e-32) and the
  complement's 2FN / max(2FN + TP + TN, 1e-32).
  - best: the sorted float32 values of the scored pixels; for every distinct value v, pred =
    value > v (v = the maximum predicts nothing; "everything" is only reached by the complement
    of that cut); F1 in float32, as the script's cumulative sums are. NaN when no pixel is scored
    (the script's sweep fails on an empty array and records NaN).
  - fixed: pred = prob > 0.5 on the scored pixels, counts from sklearn's confusion_matrix, which
    is 1 x 1 (an IndexError, recorded as NaN) when ground truth and prediction hold one and the
    same single value there, e.g. no counted positive and nothing predicted, or only counted
    positives all predicted; NaN too when no pixel is scored.

  band: (valid, positives) from border_band, if already computed.
  Returns {'f1_best', 'f1_fixed', 'inverted_best', 'inverted_fixed'}: Python numbers; inverted_*
  says the complement's F1 was the larger (False where NaN).
  """
  gt = np.asarray(gt) > 0
  valid, positives = border_band(gt, erode, dilate) if band is None else band
  result = {"f1_best": math.nan, "f1_fixed": math.nan, "inverted_best": False}
  result["inverted_fixed"] = False
  values = np.asarray(prob, np.float32)[valid]
  positive = positives[valid]
  if values.size == 0:
    return result
  # Best threshold: threshold_sweep's cuts without its last ("everything"), i.e. value > v for
  # each distinct v, in float32 as TruFor's float32 cumulative sums.
  tp, fp, _ = threshold_sweep(values, positive)
  tp, fp = tp[:-1].astype(np.float32), fp[:-1].astype(np.float32)
  fn = np.float32(positive.sum()) - tp
  tn = np.float32((~positive).sum()) - fp
  tiny, two = np.float32(TRUFOR_NO_DIVISION), np.float32(2)
  f1 = two * tp / np.maximum(two * tp + fn + fp, tiny)
  f1_inverse = two * fn / np.maximum(two * fn + tp + tn, tiny)
  result["f1_best"] = float(max(f1.max(), f1_inverse.max()))
  result["inverted_best"] = bool(f1_inverse.max() > f1.max())
  # Fixed threshold 0.5, counts as sklearn's confusion_matrix (float64 arithmetic).
  pred = np.asarray(prob)[valid] > 0.5
  if len(np.union1d(np.unique(positive), np.unique(pred))) < 2:
    return result
  tp, fp, fn, tn = (float(c) for c in _confusion(pred, positive))
  f1 = 2 * tp / max(2 * tp + fn + fp, TRUFOR_NO_DIVISION)
  f1_inverse = 2 * fn / max(2 * fn + tp + tn, TRUFOR_NO_DIVISION)
  result["f1_fixed"] = max(f1, f1_inverse)
  result["inverted_fixed"] = f1_inverse > f1
  return result


def miml_official_threshold(path: str, image_prob: float) -> float:
  """The official APSC-Net inference's threshold (qcf-568/MIML, models for IML/mmseg/models/
  segmentors/viz_encoder_decoder.py, `inference`): clamp(1 - p_image, 0.3, 0.7) in float32 when
  the model has an image head (p_image not NaN) and the image's path, lowercased, does not contain
  '/imd'; 0.5 otherwise (IMD2020 is always scored at 0.5)."""
  if math.isnan(image_prob) or "/imd" in str(path).lower():
    return 0.5
  return float(np.clip(np.float32(1) - np.float32(image_prob), np.float32(0.3), np.float32(0.7)))


def miml_official_scores(prob, gt, threshold: float) -> dict:
  """One image as the official MIML inference scripts score it (casia1_infer.py, imd_infer.py):
  pred = prob > threshold (compared in float32, as the script's tensors), ground truth gt > 0,
  the protocol's formulas in float64. An image without a tampered pixel scores 0 everywhere."""
  pred = np.asarray(prob, np.float32) > np.float32(threshold)
  tp, fp, fn, _ = (float(c) for c in _confusion(pred, gt))
  return {key: float(value) for key, value in scores_from_counts(tp, fp, fn).items()}


BENCO_EPS = np.float32(1e-8)  # IMDLBenCo's PixelF1 and PixelIOU epsilons (float32 tensors)


def ranked_auc(scores, positive) -> float:
  """ROC AUC without grouping tied scores, as IMDLBenCo's PixelAUC.Cal_AUC: the pixels sorted by
  decreasing score, one ROC point per pixel, trapezoids between them. Ties are not averaged:
  a positive ranked before a negative of the same score counts as above it. The reference leaves
  the order of equal scores to torch.argsort (unspecified; CPU and GPU differ); here they keep
  raster order (a stable sort), so without ties the result is exact and with ties it is one of
  the reference's possible results. Computed exactly (the reference accumulates in float32).

  Returns 0.0 when there is no positive (the reference's rule) and NaN when there is no negative
  (its FPR divides 0 by 0).
  """
  scores = np.asarray(scores, np.float32).ravel()
  positive = np.asarray(positive, bool).ravel()
  num_pos = int(positive.sum())
  num_neg = positive.size - num_pos
  if num_pos == 0:
    return 0.0
  if num_neg == 0:
    return math.nan
  ranked = positive[np.argsort(-scores, kind="stable")]
  # Each step to a negative adds (positives ranked so far) / (P N); a step to a positive adds 0.
  positives_before = np.cumsum(ranked, dtype=np.int64)[~ranked]
  return float(positives_before.sum(dtype=np.float64) / (float(num_pos) * float(num_neg)))


def _benco_f1(tp, fp, fn):
  precision = tp / (tp + fp + BENCO_EPS)
  recall = tp / (tp + fn + BENCO_EPS)
  return np.float32(2) * precision * recall / (precision + recall + BENCO_EPS)


def _benco_iou(pred, gt):
  intersection = np.float32(np.count_nonzero(pred & gt))
  union = np.float32(np.count_nonzero(pred)) + np.float32(np.count_nonzero(gt)) - intersection
  return intersection / (union + BENCO_EPS)


def imdlbenco_scores(prob, gt) -> dict:
  """One image as IMDLBenCo's pixel evaluators score it (scu-zjz/IMDLBenCo, IMDLBenCo/evaluation/
  F1.py, IOU.py, AUC.py), in float32 as its tensors, with gt the binary ground truth:

  - f1 (PixelF1, mode 'origin'): pred = prob > 0.5; P = TP / (TP + FP + 1e-8), R = TP / (TP + FN
    + 1e-8), F1 = 2PR / (P + R + 1e-8). An image without a tampered pixel scores 0.
  - f1_double (mode 'double'): the larger of that and the same F1 of the complement of the
    binarised map (its confusion matrix with TP <-> FN, FP <-> TN): pixels exactly at 0.5 are
    positive in the complement.
  - iou (PixelIOU, 'origin'): I / (U + 1e-8) of prob > 0.5.
  - iou_double ('double'): the larger of that and the IoU of (1 - prob) > 0.5, i.e. of the map
    inverted BEFORE thresholding: pixels exactly at 0.5 are negative both ways, so the two double
    modes disagree at exactly 0.5.
  - auc (PixelAUC, 'origin'): ranked_auc(prob, gt), 0 without a tampered pixel.
  - auc_double ('double'): the larger of that and ranked_auc(1 - prob, gt).
  Returns Python floats.
  """
  prob = np.asarray(prob, np.float32)
  gt = np.asarray(gt, bool)
  pred = prob > np.float32(0.5)
  tp, fp, fn, tn = (np.float32(c) for c in _confusion(pred, gt))
  f1 = _benco_f1(tp, fp, fn)
  iou = _benco_iou(pred, gt)
  complement = np.float32(1) - prob
  auc = ranked_auc(prob, gt)
  auc_inverse = ranked_auc(complement, gt)
  return {
    "f1": float(f1),
    "f1_double": float(max(f1, _benco_f1(fn, tn, tp))),
    "iou": float(iou),
    "iou_double": float(max(iou, _benco_iou(complement > np.float32(0.5), gt))),
    "auc": auc,
    # max() of a NaN and a number depends on the order in Python; NaN either way here.
    "auc_double": math.nan if math.isnan(auc) else max(auc, auc_inverse),
  }
