"""Evaluation with the MIML protocol: per-image IoU / P / R / F1 over tampered images, their
means, pooled versions and pixel AUC (metrics.py), plus the trivial predictors for scale and a
contact sheet of heatmaps.

    miml-jax eval --checkpoint W [--data folder:/path/to/MIML_layout] [--out DIR] [--json]

Threshold (`eval.threshold_policy`): 'fixed' uses `eval.threshold` (0.5 is the usual
third-party convention); 'image_head' is the official rule t = clamp(1 - p_tampered_image, 0.3,
0.7), p from the model's image-level head. Test-time resize
(`eval.resize`): 'none' (every image at its own size) or 'miml' (predict.miml_test_size).
Only images whose mask has a tampered pixel are scored for localisation, as in the protocol.
"""

import os

import numpy as np

from miml_jax import metrics as metrics_lib
from miml_jax import visualize
from miml_jax.errors import UserInputError
from miml_jax.predict import Predictor


def threshold_for(eval_cfg, image_prob: float) -> float:
  if eval_cfg.threshold_policy == "fixed":
    return float(eval_cfg.threshold)
  if eval_cfg.threshold_policy != "image_head":
    raise UserInputError(f"eval.threshold_policy='{eval_cfg.threshold_policy}': expected "
                         f"'fixed' or 'image_head'")
  if np.isnan(image_prob):
    raise UserInputError("eval.threshold_policy='image_head' but the model has no image head "
                         "(model.head.image_head=False)")
  return float(np.clip(1.0 - image_prob, 0.3, 0.7))


def threshold_name(eval_cfg) -> str:
  return (f"{eval_cfg.threshold:g}" if eval_cfg.threshold_policy == "fixed"
          else "image_head")


def make_predictor(model, variables, config, mesh=None) -> Predictor:
  """The Predictor `evaluate` uses: the config's eval batch size and test-time resize rule."""
  return Predictor(model, variables, config, batch_size=config.eval.batch_size,
                   resize=config.eval.resize, mesh=mesh)


def evaluate(model, variables, config, source, out_dir: str | None = None,
             limit: int | None = None, mesh=None, predictor: Predictor | None = None) -> dict:
  """Scores `source` (records with 'image' and 'mask'); writes pictures into out_dir if given.

  predictor: one from make_predictor to reuse (its compiled function) with these variables.
  Returns {'summary', 'trivial': {'all_zero', 'all_one'}, 'per_image', 'threshold', 'resize'}.
  """
  eval_cfg = config.eval
  if predictor is None:
    predictor = make_predictor(model, variables, config, mesh)
  else:
    predictor.set_variables(variables)
  scores = metrics_lib.MetricAccumulator()
  all_zero, all_one = metrics_lib.MetricAccumulator(), metrics_lib.MetricAccumulator()
  rows, skipped_authentic = [], 0
  for sample, prob, image_prob in predictor.predict(source, limit=limit):
    gt = sample["mask"] > 0
    if not gt.any():
      skipped_authentic += 1  # Authentic images get no localisation score in the protocol.
      continue
    threshold = threshold_for(eval_cfg, image_prob)
    scores.add(prob, gt, threshold=threshold, name=sample["id"])
    all_zero.add(np.zeros_like(prob), gt, threshold=0.5)
    all_one.add(np.ones_like(prob), gt, threshold=0.5)
    if out_dir is not None and len(rows) < eval_cfg.num_pictures:
      rows.append(visualize.comparison_row(sample["image"], gt, prob, threshold,
                                           title=os.path.basename(sample["id"])))
  if scores.summary()["num_images"] == 0:
    raise UserInputError("evaluation data has no image with a tampered pixel to score")
  result = {"summary": scores.summary(),
            "trivial": {"all_zero": all_zero.summary(), "all_one": all_one.summary()},
            "per_image": scores.per_image(),
            "threshold": threshold_name(eval_cfg), "resize": eval_cfg.resize,
            "num_authentic_skipped": skipped_authentic,
            # Examples left out because their files could not be read (data.on_error='skip').
            "unreadable_skipped": list(getattr(source, "skipped", []))}
  if out_dir is not None:
    os.makedirs(out_dir, exist_ok=True)
    visualize.save(os.path.join(out_dir, "predictions.png"), visualize.contact_sheet(rows))
  return result


def format_table(result: dict) -> str:
  """The human-readable table: model vs the trivial predictors."""
  lines = [f"{'':<12}{'IoU':>8}{'P':>8}{'R':>8}{'F1':>8}{'pixAUC':>8}"]
  for name, summary in (("model", result["summary"]),
                        ("all-zero", result["trivial"]["all_zero"]),
                        ("all-one", result["trivial"]["all_one"])):
    auc = summary["pixel_auc"]
    lines.append(f"{name:<12}{summary['iou']:>8.4f}{summary['precision']:>8.4f}"
                 f"{summary['recall']:>8.4f}{summary['f1']:>8.4f}"
                 f"{(auc if auc == auc else float('nan')):>8.4f}")
  lines.append(f"{result['summary']['num_images']} tampered images; threshold "
               f"{result['threshold']}; resize {result['resize']}")
  skipped = result.get("unreadable_skipped", [])
  if skipped:
    lines.append(f"{len(skipped)} unreadable example(s) left out (data.on_error='skip'), e.g. "
                 f"{skipped[0]}")
  return "\n".join(lines)
