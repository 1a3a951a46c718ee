"""An evaluation as a Markdown report with its pictures (what `miml-jax eval --out DIR` writes).

DIR/report.md          headline vs trivial predictors, every convention, image-level
                       detection, robustness, with the command that made it
DIR/curves.png         pooled pixel precision-recall and ROC; image-level ROC
DIR/histograms.png     per-image IoU / F1 and image-level scores by class
DIR/best.jpg, worst.jpg  the images the model does best and worst on (headline F1)
DIR/robustness.png     one panel per perturbation kind (with --perturb)
"""

import datetime
import os
import platform

import numpy as np

from miml_jax import metrics, visualize


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _fmt(value) -> str:
  if value is None:
    return "clean"
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return str(value)
  return "-" if value != value else f"{value:.4f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += [
    "| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows
  ]
  return lines + [""]


def plot_curves(result: dict, path: str):
  plt = _pyplot()
  pixel = result["curves"]["pixel"]
  detection = result["per_image_detection"]
  labels = [d["manipulated"] for d in detection]
  show_image_roc = 0 < sum(labels) < len(labels)
  fig, axes = plt.subplots(
    1, 3 if show_image_roc else 2, figsize=(13 if show_image_roc else 9, 3.8)
  )
  axes[0].plot(pixel["recall"], pixel["precision"])
  axes[0].set(
    xlabel="recall",
    ylabel="precision",
    xlim=(0, 1),
    ylim=(0, 1.02),
    title=f"pixels, pooled (pooled F1 at t: {result['summary']['pooled_f1']:.3f})",
  )
  axes[1].plot(pixel["fpr"], pixel["recall"])
  axes[1].plot([0, 1], [0, 1], ":", color="grey")
  axes[1].set(
    xlabel="false positive rate",
    ylabel="true positive rate",
    xlim=(0, 1),
    ylim=(0, 1.02),
    title=f"pixel ROC, pooled (AUC {result['summary']['pixel_auc_pooled']:.3f})",
  )
  if show_image_roc:
    for score in ("max", "head"):
      values = [d[f"score_{score}"] for d in detection]
      if score in result["image_level"]:
        tp, fp, _ = metrics.threshold_sweep(values, labels)
        auc = result["image_level"][score]["auc"]
        axes[2].plot(fp / max(fp[-1], 1), tp / max(tp[-1], 1), label=f"{score} (AUC {auc:.3f})")
    axes[2].plot([0, 1], [0, 1], ":", color="grey")
    axes[2].set(
      xlabel="false positive rate",
      ylabel="true positive rate",
      xlim=(0, 1),
      ylim=(0, 1.02),
      title="image-level ROC",
    )
    axes[2].legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_histograms(result: dict, path: str):
  plt = _pyplot()
  rows, detection = result["per_image"], result["per_image_detection"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  bins = np.linspace(0, 1, 21)
  axes[0].hist(
    [[r["iou"] for r in rows], [r["f1"] for r in rows]],
    bins=bins,
    label=[
      f"IoU (mean {result['summary']['iou']:.3f})",
      f"F1 (mean {result['summary']['f1']:.3f})",
    ],
  )
  axes[0].set(
    xlabel=f"per-image score at threshold {result['threshold']}",
    ylabel="images",
    title=f"{len(rows)} manipulated images",
  )
  axes[0].legend()
  for score in ("max", "head"):
    if score not in result["image_level"]:
      continue
    for manipulated, style in ((True, "-"), (False, "--")):
      values = [d[f"score_{score}"] for d in detection if d["manipulated"] == manipulated]
      if values:
        axes[1].hist(
          values,
          bins=bins,
          histtype="step",
          linestyle=style,
          label=f"{score}, {'manipulated' if manipulated else 'authentic'}",
        )
  axes[1].set(xlabel="image-level score", ylabel="images", title="image-level scores")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_robustness(rows: list[dict], path: str):
  plt = _pyplot()
  kinds = list(dict.fromkeys(r["kind"] for r in rows))
  fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.6), squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    points = [r for r in rows if r["kind"] == kind and r["value"] is not None]
    clean = [r for r in rows if r["kind"] == kind and r["value"] is None]
    values = [r["value"] for r in points]
    for key in ("iou", "f1", "pixel_auc", "image_auc_max"):
      if all(key in r for r in points):
        line = ax.plot(values, [r[key] for r in points], marker="o", label=key)[0]
        if clean:
          ax.axhline(clean[0][key], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set(
      xlabel={
        "jpeg": "JPEG quality",
        "blur": "Gaussian kernel size",
        "noise": "noise standard deviation",
        "resize": "scale factor",
      }[kind],
      ylim=(0, 1),
      title=f"{kind} (dotted: clean)",
    )
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write(out_dir: str, result: dict, command: str, robustness: list[dict] | None = None):
  """Writes report.md and its pictures into out_dir; returns the report's path."""
  os.makedirs(out_dir, exist_ok=True)
  summary, trivial = result["summary"], result["trivial"]
  lines = [
    f"# Evaluation: {result.get('data', '')}",
    "",
    f"- weights: `{result.get('checkpoint', '')}`"
    + (f" (step {result['step']})" if result.get("step") is not None else ""),
    f"- command: `{command}`",
    f"- made {datetime.datetime.now().isoformat(timespec='seconds')} on "
    f"{platform.node() or 'this machine'} ({platform.machine()}, "
    f"{result.get('devices', 'unknown devices')})",
    f"- {summary['num_images']} manipulated images scored for localisation, "
    f"{result['num_authentic_skipped']} without a tampered pixel (image level only); "
    f"threshold {result['threshold']}, test-time resize {result['resize']}",
    "",
  ]
  skipped = result.get("unreadable_skipped", [])
  if skipped:
    lines += [
      f"- {len(skipped)} unreadable example(s) left out (data.on_error='skip'): "
      + "; ".join(skipped[:5]),
      "",
    ]
  lines += [
    "## Headline: the MIML protocol",
    "",
    "Per-image scores averaged over manipulated images (the protocol's numbers), the "
    "same on pooled pixels, and the trivial predictors for scale.",
    "",
  ]
  keys = ("iou", "precision", "recall", "f1", "pixel_auc")
  pooled = {k: summary.get(f"pooled_{k}") for k in keys[:4]}
  pooled["pixel_auc"] = summary["pixel_auc_pooled"]
  lines += _table(
    ["", "IoU", "P", "R", "F1", "pixel AUC"],
    [
      ["model, per image", *(summary[k] for k in keys)],
      ["model, pooled pixels", *(pooled[k] for k in keys)],
      ["all-zero", *(trivial["all_zero"][k] for k in keys)],
      ["all-one", *(trivial["all_one"][k] for k in keys)],
    ],
  )
  if result.get("conventions"):
    lines += [
      "## Other conventions",
      "",
      "The same predictions scored as other papers do; each row is its own rule.",
      "",
    ]
    lines += _table(
      ["convention", "IoU", "P", "R", "F1", "rule"],
      [
        [name, *(c[k] for k in ("iou", "precision", "recall", "f1")), c["description"]]
        for name, c in result["conventions"].items()
      ],
    )
  lines += ["## Image-level detection", ""]
  level = result["image_level"]
  lines += _table(
    ["score", "AUC", "accuracy", "balanced accuracy", "manipulated", "authentic"],
    [
      [
        score,
        d["auc"],
        d["accuracy"],
        d["balanced_accuracy"],
        d["num_manipulated"],
        d["num_authentic"],
      ]
      for score, d in level.items()
    ],
  )
  lines += [
    "Scores: `max` is the maximum of the probability map, `head` the model's image "
    "head; accuracy at score > 0.5. AUC needs authentic images.",
    "",
  ]
  plot_curves(result, os.path.join(out_dir, "curves.png"))
  plot_histograms(result, os.path.join(out_dir, "histograms.png"))
  lines += [
    "## Curves and distributions",
    "",
    "![curves](curves.png)",
    "",
    "![histograms](histograms.png)",
    "",
  ]
  pictures = result.get("pictures", {})
  for which in ("best", "worst"):
    if pictures.get(which):  # JPEG: photographs, for people to look at (a tenth of a PNG).
      visualize.save(
        os.path.join(out_dir, f"{which}.jpg"), visualize.contact_sheet(pictures[which])
      )
      lines += [
        f"## {which.capitalize()} images (headline F1)",
        "",
        "image | ground truth | heatmap | binary prediction",
        "",
        f"![{which}]({which}.jpg)",
        "",
      ]
  if robustness:
    plot_robustness(robustness, os.path.join(out_dir, "robustness.png"))
    keys = [
      k for k in ("iou", "f1", "pixel_auc", "image_auc_max", "image_auc_head") if k in robustness[0]
    ]
    lines += ["## Robustness", ""]
    lines += _table(
      ["perturbation", "value", *keys],
      [[r["kind"], r["value"], *(r.get(k) for k in keys)] for r in robustness],
    )
    lines += ["![robustness](robustness.png)", ""]
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path
