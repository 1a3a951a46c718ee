"""Evaluation: the MIML protocol as the headline, every other convention (docs/evaluation.md) under
its own name, image-level detection, and the material of a report.

    miml-jax eval --checkpoint W [--data SOURCE] [--out DIR] [--perturb jpeg:50,70,90] [--json]

Headline (`summary`, what training validates and keeps the best checkpoint by): per-image IoU /
P / R / F1 over manipulated images and their means, the same pooled over all pixels (one
confusion matrix), and pixel AUC per image (mean) and pooled. Threshold
(`eval.threshold_policy`): 'fixed' uses `eval.threshold`; 'image_head' is the official rule
t = clamp(1 - p_tampered_image, 0.3, 0.7), p from the model's image-level head. Test-time resize
(`eval.resize`): 'none' (every image at its own size) or 'miml' (transforms.test_size).
Only images whose mask has a tampered pixel are scored for the headline. The official MIML
scripts average over every file of the test folder instead, so an authentic image adds zeros
there; their folders hold tampered images only, where the two agree, and on any other data that
mean is the `miml_official` convention (CONVENTIONS), reported next to the headline.

Other conventions (`eval.conventions`, a comma-separated subset of CONVENTIONS or 'all'), each
reported under its own key in `conventions`, never mixed into the headline: see CONVENTIONS.

Image-level detection (`image_level`), over every image, authentic ones included (label =
manipulated iff the mask has a tampered pixel, or the example's `is_authentic` flag says so):
ROC AUC, accuracy and balanced accuracy at score > 0.5, for two scores: 'max' (the maximum of
the probability map) and 'head' (the model's image-level head, when it has one).
"""

import heapq
import os
import time

import cv2
import numpy as np

from miml_jax import metrics as metrics_lib
from miml_jax import perturb, visualize
from miml_jax.errors import UserInputError
from miml_jax.predict import Predictor


def threshold_for(eval_cfg, image_prob: float) -> float:
  if eval_cfg.threshold_policy == "fixed":
    return float(eval_cfg.threshold)
  if eval_cfg.threshold_policy != "image_head":
    raise UserInputError(
      f"eval.threshold_policy='{eval_cfg.threshold_policy}': expected 'fixed' or 'image_head'"
    )
  return image_head_threshold(image_prob)


def image_head_threshold(image_prob: float) -> float:
  """The official rule: t = clamp(1 - p_tampered_image, 0.3, 0.7), p from the image head (without
  its exception for paths with '/imd', which only the miml_official convention applies)."""
  if np.isnan(image_prob):
    raise UserInputError(
      "threshold image_head, but the model has no image head (model.head.image_head=False)"
    )
  return float(np.clip(1.0 - image_prob, 0.3, 0.7))


def threshold_name(eval_cfg) -> str:
  return f"{eval_cfg.threshold:g}" if eval_cfg.threshold_policy == "fixed" else "image_head"


def make_predictor(model, variables, config, mesh=None) -> Predictor:
  """The Predictor `evaluate` uses: the config's eval batch size and test-time resize rule."""
  return Predictor(
    model,
    variables,
    config,
    batch_size=config.eval.batch_size,
    resize=config.eval.resize,
    mesh=mesh,
  )


# name -> what it computes (the one-line descriptions that also go into the JSON; the exact rules
# are in docs/evaluation.md#other-conventions). Unless it says otherwise, a convention averages
# over the manipulated images (those the headline scores) with the protocol's formulas
# (metrics.scores_from_counts); the reference restatements are metrics.trufor_scores,
# miml_official_scores and imdlbenco_scores.
CONVENTIONS = {
  "fixed_0.5": "prob > 0.5, per image then averaged (the most common third-party number)",
  "best_per_image": "each image at its own best-F1 threshold (an oracle upper bound)",
  "best_per_image_inverse": "best threshold, the better of map and 1 - map (TruFor's max)",
  "trufor_fixed_0.5": "TruFor's test_docker/metrics.py: boundary band not scored (erode 15, "
  "dilate 11), max(F1(map), F1(1 - map)) at 0.5; NaN where its script fails, nanmean (F1 only)",
  "trufor_best": "TruFor's script: band not scored, best threshold of either polarity; NaN "
  "where no pixel is scored, nanmean (F1 only)",
  "trufor_band_fixed_0.5": "TruFor's band, scored 0/1 where TruFor gives NaN: every manipulated "
  "image counts; the protocol's formulas",
  "trufor_band_best": "TruFor's band and best threshold of either polarity, scored 0/1 where "
  "TruFor gives NaN",
  "miml_official": "the official MIML scripts: mean over EVERY image (authentic ones add 0), "
  "t = clamp(1 - p_image, 0.3, 0.7), or 0.5 without an image head or for paths with '/imd'",
  "imdlbenco": "IMDLBenCo's PixelF1 / PixelIOU / PixelAUC ('origin'): gt = grey > 127.5, prob "
  "> 0.5, mean over EVERY image (authentic ones add 0), AUC without tie grouping",
  "imdlbenco_double": "IMDLBenCo's 'double' modes: F1 of the better of pred and NOT pred (0.5 "
  "counts inverted), IoU of the better of prob and 1 - prob > 0.5 (0.5 never counts), max AUC",
}
TRUFOR_BAND = (15, 11)
IMAGE_SCORE_THRESHOLD = 0.5
# Conventions that average over every image, authentic ones included, as their scripts do.
_EVERY_IMAGE = ("miml_official", "imdlbenco", "imdlbenco_double")
_SCORE_KEYS = ("iou", "precision", "recall", "f1")


def parse_conventions(value) -> tuple[str, ...]:
  """'all', '' / 'none', or a comma-separated list of CONVENTIONS names (or a sequence)."""
  if isinstance(value, str):
    value = value.strip()
    if value == "all":
      return tuple(CONVENTIONS)
    value = [] if value in ("", "none") else [v.strip() for v in value.split(",")]
  unknown = [name for name in value if name not in CONVENTIONS]
  if unknown:
    raise UserInputError(
      f"eval.conventions: unknown {', '.join(unknown)} (known: all, none, {', '.join(CONVENTIONS)})"
    )
  return tuple(value)


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def _nanmean(values) -> float:
  kept = [v for v in values if not np.isnan(v)]
  return float(np.mean(kept)) if kept else float("nan")


class ConventionScores:
  """Per-image scores under each named convention; `summary()` averages them.

  `add` takes every image, authentic ones included: the conventions of _EVERY_IMAGE average over
  all of them, the others over the images whose mask has a tampered pixel (mask > 0).
  """

  def __init__(self, names):
    self.names = tuple(names)
    self.fixed = metrics_lib.MetricAccumulator() if "fixed_0.5" in self.names else None
    self.rows = {name: [] for name in self.names if name != "fixed_0.5"}

  def add(self, prob, mask, name, image_prob: float = float("nan"), path: str | None = None):
    """Scores one image. mask: its grey mask (uint8 0..255; a boolean one counts True as 255);
    image_prob: the image head's p_tampered (NaN without one); path: the string the official
    MIML threshold rule looks for '/imd' in (default: name). Returns the per-image row
    ({NAME_f1: ...}), empty for an authentic image."""
    mask = np.asarray(mask)
    if mask.dtype == bool:
      mask = mask.astype(np.uint8) * np.uint8(255)
    gt = mask > 0
    manipulated = bool(gt.any())
    row = {}
    if "miml_official" in self.rows:
      threshold = metrics_lib.miml_official_threshold(name if path is None else path, image_prob)
      scores = metrics_lib.miml_official_scores(prob, gt, threshold)
      imd = "/imd" in str(name if path is None else path).lower()
      self.rows["miml_official"].append(dict(scores, authentic=not manipulated, imd_path=imd))
      row["miml_official_f1"] = scores["f1"]
    if {"imdlbenco", "imdlbenco_double"} & set(self.rows):
      benco_gt = mask > 127.5  # IMDLBenCo: mean of the RGB channels > 127.5.
      scores = metrics_lib.imdlbenco_scores(prob, benco_gt)
      for key, suffix in (("imdlbenco", ""), ("imdlbenco_double", "_double")):
        if key in self.rows:
          entry = {score: scores[score + suffix] for score in ("f1", "iou", "auc")}
          self.rows[key].append(dict(entry, authentic=not benco_gt.any()))
          row[f"{key}_f1"] = entry["f1"]
    if not manipulated:
      return {}
    if self.fixed is not None:
      row["fixed_0.5_f1"] = self.fixed.add(prob, gt, threshold=0.5, name=name)["f1"]
    band = (
      metrics_lib.border_band(gt, *TRUFOR_BAND)
      if any(n.startswith("trufor") for n in self.rows)
      else None
    )
    # Both oracles from one sort of the image's pixels.
    oracle = (
      metrics_lib.oracle_scores(prob, gt)
      if {"best_per_image", "best_per_image_inverse"} & set(self.rows)
      else None
    )
    trufor = (
      metrics_lib.trufor_scores(prob, gt, *TRUFOR_BAND, band=band)
      if {"trufor_fixed_0.5", "trufor_best"} & set(self.rows)
      else None
    )
    for key in self.rows:
      if key in _EVERY_IMAGE:
        continue
      if key == "best_per_image":
        scores = dict(oracle[0])
      elif key == "best_per_image_inverse":
        scores = dict(oracle[1])
      elif key in ("trufor_fixed_0.5", "trufor_best"):
        kind = "fixed" if key == "trufor_fixed_0.5" else "best"
        scores = {"f1": trufor[f"f1_{kind}"], "inverted": trufor[f"inverted_{kind}"]}
      elif key == "trufor_band_fixed_0.5":
        scores = metrics_lib.fixed_threshold_scores(prob, band[1], 0.5, valid=band[0], inverse=True)
      else:  # trufor_band_best
        scores = metrics_lib.best_threshold_scores(prob, band[1], valid=band[0], inverse=True)
      if key.startswith("trufor_band"):
        scores["band_empty"] = not band[1].any()  # Object thinner than the erosion: F1 = 0.
      self.rows[key].append(scores)
      row[f"{key}_f1"] = scores["f1"]
    return row

  def summary(self) -> dict:
    result = {}
    if self.fixed is not None:
      result["fixed_0.5"] = self.fixed.summary()
    for key, rows in self.rows.items():
      entry = {"num_images": len(rows)}
      if key in ("trufor_fixed_0.5", "trufor_best"):
        # TruFor's script reports F1 only, as np.nanmean over images.
        entry.update({score: float("nan") for score in _SCORE_KEYS})
        entry["f1"] = _nanmean([r["f1"] for r in rows])
        entry["num_nan"] = int(sum(np.isnan(r["f1"]) for r in rows))
        entry["inverted_fraction"] = _mean([r["inverted"] for r in rows if not np.isnan(r["f1"])])
      elif key == "miml_official":
        entry.update({score: _mean([r[score] for r in rows]) for score in _SCORE_KEYS})
        entry["num_authentic"] = int(sum(r["authentic"] for r in rows))
        entry["num_imd_path"] = int(sum(r["imd_path"] for r in rows))  # Scored at 0.5.
      elif key in ("imdlbenco", "imdlbenco_double"):
        entry.update({score: float("nan") for score in ("precision", "recall")})
        entry.update({score: _mean([r[score] for r in rows]) for score in ("iou", "f1")})
        entry["pixel_auc"] = _mean([r["auc"] for r in rows])  # NaN propagates, as there.
        entry["num_authentic"] = int(sum(r["authentic"] for r in rows))
      else:
        entry.update({score: _mean([r[score] for r in rows]) for score in _SCORE_KEYS})
        entry["inverted_fraction"] = _mean([r["inverted"] for r in rows])
        if key.startswith("trufor_band"):
          entry["num_band_empty"] = int(sum(r["band_empty"] for r in rows))
      result[key] = entry
    for key, entry in result.items():
      entry["description"] = CONVENTIONS[key]
    return {key: result[key] for key in self.names}


class _Extremes:
  """The k best and k worst images by headline F1, as small comparison rows (bounded memory)."""

  def __init__(self, count: int, height: int = 160):
    self.count, self.height = count, height
    self._best, self._worst, self._seen = [], [], 0

  def add(self, f1, make_row):
    if self.count <= 0:
      return
    self._seen += 1
    entry_best, entry_worst = (f1, -self._seen), (-f1, -self._seen)
    keep_best = len(self._best) < self.count or entry_best > self._best[0][:2]
    keep_worst = len(self._worst) < self.count or entry_worst > self._worst[0][:2]
    if not (keep_best or keep_worst):
      return
    row = make_row()
    width = max(1, round(row.shape[1] * self.height / row.shape[0]))
    row = cv2.resize(row, (width, self.height), interpolation=cv2.INTER_AREA)
    for heap, entry, keep in (
      (self._best, entry_best, keep_best),
      (self._worst, entry_worst, keep_worst),
    ):
      if keep:
        (heapq.heappush if len(heap) < self.count else heapq.heapreplace)(heap, (*entry, row))

  def rows(self) -> dict:
    return {
      "best": [r for *_, r in sorted(self._best, reverse=True)],
      "worst": [r for *_, r in sorted(self._worst, reverse=True)],
    }


def evaluate(
  predictor: Predictor,
  config,
  source,
  out_dir: str | None = None,
  limit: int | None = None,
  conventions=None,
  extremes: int = 0,
  image_field: str = "image",
) -> dict:
  """Scores `source` (records with a 'mask' and `image_field`, the image the predicted map
  belongs to) with `predictor` (one from make_predictor, holding the weights to score); writes
  pictures into out_dir if given.

  conventions: names from CONVENTIONS (default: `eval.conventions`).
  extremes: keep the k best and k worst images by headline F1 as picture rows
    (result['pictures']) for a report.
  Returns {'summary', 'trivial': {'all_zero', 'all_one'}, 'conventions', 'image_level',
  'per_image', 'per_image_detection', 'curves', 'threshold', 'resize', ...}.
  """
  eval_cfg = config.eval
  if conventions is None:
    conventions = eval_cfg.conventions
  others = ConventionScores(parse_conventions(conventions))
  scores = metrics_lib.MetricAccumulator()
  all_zero, all_one = metrics_lib.MetricAccumulator(), metrics_lib.MetricAccumulator()
  picked = _Extremes(extremes)
  rows, per_image, detection, skipped_authentic = [], [], [], 0
  for sample, prediction in predictor.predict(source, limit=limit):
    prob, image_prob = prediction["prob"], prediction["image_score"]
    gt = sample["mask"] > 0
    manipulated = bool(gt.any()) if "is_authentic" not in sample else not sample["is_authentic"]
    detection.append(
      {
        "name": sample["id"],
        "manipulated": manipulated,
        "score_max": float(prob.max()),
        "score_head": float(image_prob),
      }
    )
    # Every image: some conventions (miml_official, imdlbenco*) average authentic ones too.
    convention_row = others.add(
      prob, sample["mask"], sample["id"], image_prob=image_prob, path=sample.get("path")
    )
    if not gt.any():
      # The headline scores manipulated images only (the official scripts' mean over every
      # file is the miml_official convention).
      skipped_authentic += 1
      continue
    threshold = threshold_for(eval_cfg, image_prob)
    row = scores.add(prob, gt, threshold=threshold, name=sample["id"])
    all_zero.add(np.zeros_like(prob), gt, threshold=0.5)
    all_one.add(np.ones_like(prob), gt, threshold=0.5)
    row.update(threshold=threshold, **convention_row)
    per_image.append(row)

    def make_row(sample=sample, gt=gt, prob=prob, threshold=threshold, row=row):
      # Drawn only for images that are shown.
      return visualize.comparison_row(
        sample[image_field],
        gt,
        prob,
        threshold,
        title=f"{os.path.basename(sample['id'])} F1 {row['f1']:.2f}",
      )

    picked.add(row["f1"], make_row)
    if out_dir is not None and len(rows) < eval_cfg.num_pictures:
      rows.append(make_row())
  if not per_image:
    raise UserInputError("evaluation data has no image with a tampered pixel to score")
  result = {
    "summary": scores.summary(),
    "trivial": {"all_zero": all_zero.summary(), "all_one": all_one.summary()},
    "conventions": others.summary(),
    "image_level": _image_level(detection),
    "per_image": per_image,
    "per_image_detection": detection,
    "curves": {"pixel": _subsample(scores.pooled_curves())},
    "threshold": threshold_name(eval_cfg),
    "resize": predictor.resize,
    "num_authentic_skipped": skipped_authentic,
    # Examples left out because their files could not be read (data.on_error='skip').
    "unreadable_skipped": list(getattr(source, "skipped", [])),
  }
  if extremes > 0:
    result["pictures"] = picked.rows()
  if out_dir is not None and rows:
    os.makedirs(out_dir, exist_ok=True)
    visualize.save(os.path.join(out_dir, "predictions.png"), visualize.contact_sheet(rows))
  return result


def robustness(
  predictor: Predictor,
  config,
  source,
  points,
  clean: dict | None = None,
  limit: int | None = None,
  log=None,
  image_field: str = "image",
) -> list[dict]:
  """The headline and image-level numbers on `source` degraded by each (kind, value) of
  `points` (perturb.parse); `clean` (an evaluate() result) adds the undegraded point to each
  kind's curve. One row per point."""

  def row(kind, value, result):
    summary = result["summary"]
    entry = {"kind": kind, "value": value}
    entry.update(
      {
        key: summary[key]
        for key in (
          "iou",
          "precision",
          "recall",
          "f1",
          "pixel_auc",
          "pooled_f1",
          "pixel_auc_pooled",
        )
      }
    )
    for score, detection in result["image_level"].items():
      entry[f"image_auc_{score}"] = detection["auc"]
      entry[f"image_balanced_accuracy_{score}"] = detection["balanced_accuracy"]
    return entry

  rows = []
  for number, (kind, value) in enumerate(points):
    if clean is not None and kind not in {r["kind"] for r in rows}:
      rows.append(row(kind, None, clean))
    started = time.time()
    result = evaluate(
      predictor,
      config,
      perturb.Perturbed(source, kind, value, field=image_field),
      limit=limit,
      conventions=(),
      image_field=image_field,
    )
    rows.append(row(kind, value, result))
    if log is not None:
      log(
        f"robustness {number + 1}/{len(points)}: {kind}:{value} IoU {rows[-1]['iou']:.4f} "
        f"F1 {rows[-1]['f1']:.4f} ({time.time() - started:.1f}s)"
      )
  return rows


def format_robustness(rows: list[dict]) -> str:
  keys = [k for k in ("iou", "f1", "pixel_auc", "image_auc_max", "image_auc_head") if k in rows[0]]
  lines = [f"{'perturbation':<20}" + "".join(f"{k:>15}" for k in keys)]
  for r in rows:
    name = f"{r['kind']}:{'clean' if r['value'] is None else r['value']}"
    lines.append(f"{name:<20}" + "".join(f"{r[k]:>15.4f}" for k in keys))
  return "\n".join(lines)


def _image_level(detection: list[dict]) -> dict:
  labels = [d["manipulated"] for d in detection]
  result = {
    "max": metrics_lib.detection_scores(
      [d["score_max"] for d in detection], labels, IMAGE_SCORE_THRESHOLD
    )
  }
  if detection and not np.isnan(detection[0]["score_head"]):
    result["head"] = metrics_lib.detection_scores(
      [d["score_head"] for d in detection], labels, IMAGE_SCORE_THRESHOLD
    )
  return result


def _subsample(curves: dict, points: int = 201) -> dict:
  """Curves as lists of `points` evenly spaced thresholds (for JSON and plots)."""
  size = len(curves["threshold"])
  index = np.unique(np.linspace(0, size - 1, min(points, size)).round().astype(int))
  return {key: [float(v) for v in np.asarray(values)[index]] for key, values in curves.items()}


def format_table(result: dict) -> str:
  """The human-readable tables: model vs the trivial predictors, the other conventions, and
  image-level detection."""

  def number(value):
    return f"{value:>8.4f}" if value == value else f"{'-':>8}"

  lines = [f"{'':<26}{'IoU':>8}{'P':>8}{'R':>8}{'F1':>8}{'pixAUC':>8}"]
  for name, summary in (
    (f"model (t={result['threshold']})", result["summary"]),
    (
      "pooled pixels",
      {k[7:]: v for k, v in result["summary"].items() if k.startswith("pooled_")}
      | {"pixel_auc": result["summary"]["pixel_auc_pooled"]},
    ),
    ("all-zero", result["trivial"]["all_zero"]),
    ("all-one", result["trivial"]["all_one"]),
  ):
    lines.append(
      f"{name:<26}"
      + "".join(number(summary[k]) for k in ("iou", "precision", "recall", "f1", "pixel_auc"))
    )
  for name, summary in result.get("conventions", {}).items():
    lines.append(
      f"{name:<26}" + "".join(number(summary[k]) for k in ("iou", "precision", "recall", "f1"))
    )
  lines.append(
    f"{result['summary']['num_images']} manipulated images scored; resize {result['resize']}"
  )
  for score, detection in result.get("image_level", {}).items():
    lines.append(
      f"image level (score {score}): AUC {number(detection['auc']).strip()}  "
      f"acc {number(detection['accuracy']).strip()}  balanced acc "
      f"{number(detection['balanced_accuracy']).strip()}  "
      f"({detection['num_manipulated']} manipulated, {detection['num_authentic']} "
      f"authentic)"
    )
  skipped = result.get("unreadable_skipped", [])
  if skipped:
    lines.append(
      f"{len(skipped)} unreadable example(s) left out (data.on_error='skip'), e.g. {skipped[0]}"
    )
  return "\n".join(lines)
