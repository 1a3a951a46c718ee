"""Pictures of results: heatmap overlays, contact sheets and training curves."""

import json
import os

import cv2
import numpy as np

from miml_jax import io


def heatmap(prob: np.ndarray) -> np.ndarray:
  """Probability (H, W) in [0, 1] -> RGB uint8 (H, W, 3), blue (0) to red (1)."""
  grey = np.clip(np.round(prob * 255), 0, 255).astype(np.uint8)
  return cv2.applyColorMap(grey, cv2.COLORMAP_JET)[:, :, ::-1]


def overlay(image: np.ndarray, prob: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """The heatmap blended over the image at a constant opacity (low values stay visible)."""
  blended = image.astype(np.float32) * (1 - alpha) + heatmap(prob).astype(np.float32) * alpha
  return np.round(blended).astype(np.uint8)


def outline(image: np.ndarray, mask: np.ndarray, color=(0, 255, 0)) -> np.ndarray:
  """The image with the contour of a binary mask drawn on it."""
  out = np.ascontiguousarray(image.copy())
  contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  thickness = max(1, round(max(image.shape[:2]) / 256))
  cv2.drawContours(out, contours, -1, color, thickness)
  return out


def _label(tile: np.ndarray, text: str) -> np.ndarray:
  tile = tile.copy()  # Never draw on the caller's image: it is reused for the other tiles.
  scale = max(0.3, tile.shape[1] / 400)
  cv2.putText(
    tile,
    text,
    (3, int(14 * scale) + 2),
    cv2.FONT_HERSHEY_SIMPLEX,
    scale,
    (255, 255, 255),
    max(1, int(2 * scale)),
    cv2.LINE_AA,
  )
  cv2.putText(
    tile, text, (3, int(14 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA
  )
  return tile


def comparison_row(image, gt, prob, threshold: float, title: str = "") -> np.ndarray:
  """[image | ground truth outline | heatmap overlay | binary prediction] at a common height."""
  pred = prob > threshold
  tiles = [
    _label(image, title),
    _label(outline(image, gt), "ground truth"),
    _label(overlay(image, prob), "heatmap"),
    _label(
      np.repeat(pred[:, :, None].astype(np.uint8) * 255, 3, axis=2), f"mask > {threshold:.2f}"
    ),
  ]
  return np.concatenate(tiles, axis=1)


def sample_row(sample: dict, crop: np.ndarray, label: np.ndarray) -> np.ndarray:
  """[example as stored, its mask outlined | training crop with its labels] at a common height.

  Labels: tampered (1) in red, ignored (the soft band, 255) in grey, pristine untouched.
  """
  image, mask = sample["image"], sample["mask"]
  stored = _label(
    outline(image, mask > 0, color=(255, 0, 0)),
    f"{os.path.basename(str(sample.get('id', '')))} {image.shape[1]}x{image.shape[0]}",
  )
  seen = _label(_tinted_labels(crop, label), "training crop")
  height = stored.shape[0]
  scaled = cv2.resize(
    seen,
    (max(1, round(seen.shape[1] * height / seen.shape[0])), height),
    interpolation=cv2.INTER_NEAREST,
  )
  return np.concatenate([stored, scaled], axis=1)


def pair_row(sample: dict, crop: np.ndarray, label: np.ndarray) -> np.ndarray:
  """[authentic | forged, its mask outlined | the forged image's training crop with labels]."""
  forged = sample["forged"]
  row = sample_row(dict(sample, image=forged), crop, label)
  authentic = sample["authentic"]
  height = forged.shape[0]
  authentic = cv2.resize(
    authentic,
    (max(1, round(authentic.shape[1] * height / authentic.shape[0])), height),
    interpolation=cv2.INTER_AREA,
  )
  return np.concatenate([_label(authentic, "authentic"), row], axis=1)


def contact_sheet(rows: list[np.ndarray], width: int = 1024) -> np.ndarray:
  """Stacks rows vertically after scaling each to `width` pixels."""
  scaled = []
  for row in rows:
    height = max(1, round(row.shape[0] * width / row.shape[1]))
    scaled.append(cv2.resize(row, (width, height), interpolation=cv2.INTER_AREA))
  return np.concatenate(scaled, axis=0)


def plot_history(
  jsonl_path: str, png_path: str, scores: tuple[str, ...] = ("iou", "f1", "pixel_auc")
):
  """Training loss and the validation `scores` (the task's) against the step, from the
  trainer's metrics.jsonl."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not os.path.isfile(jsonl_path):
    return
  with open(jsonl_path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [r for r in records if "loss" in r]
  val = [r for r in records if f"val_{scores[0]}" in r]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  if train:
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="loss")
    axes[0].set_yscale("log")
  axes[0].set_xlabel("step")
  axes[0].set_title("training loss")
  for key in scores:
    if val:
      axes[1].plot([r["step"] for r in val], [r[f"val_{key}"] for r in val], marker="o", label=key)
  axes[1].set_xlabel("step")
  axes[1].set_ylim(0, 1)
  axes[1].set_title("validation")
  axes[1].legend()
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)


def save(path: str, image: np.ndarray):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  io.write_image(path, image)


def _tinted_labels(crop: np.ndarray, label: np.ndarray) -> np.ndarray:
  """A training crop with tampered (1) pixels tinted red and ignored (255) ones grey."""
  seen = crop.astype(np.float32)
  for value, color in ((1, (255, 0, 0)), (255, (128, 128, 128))):
    where = label == value
    seen[where] = seen[where] * 0.5 + np.array(color, np.float32) * 0.5
  return np.round(seen).astype(np.uint8)


def jitter_row(sample: dict, crop: np.ndarray, label: np.ndarray) -> np.ndarray:
  """[host crop before | the forgery after it, mask outlined | training crop].

  For a sample of a `coco:` (Object Jitter), `coco_splice:` or `coco_copymove:` source read with
  `keep_host` ('host_image' holds the crop before the forgery). The first two panels are
  unscaled and differ only where the object was pasted (its mask, outlined in red, and for
  Object Jitter the soft alpha just around it), so a person can check the forgery by eye; a
  sample where no object qualified (authentic fallback) says so.
  """
  host, forged, mask = sample["host_image"], sample["image"], sample["mask"] > 0
  before = _label(host, f"{os.path.basename(str(sample.get('id', '')))} before")
  after = _label(
    outline(forged, mask, color=(255, 0, 0)),
    f"after {sample.get('kind', 'jitter')}" if mask.any() else "no object: authentic",
  )
  seen = _label(_tinted_labels(crop, label), "training crop")
  height = host.shape[0]
  scaled = cv2.resize(
    seen,
    (max(1, round(seen.shape[1] * height / seen.shape[0])), height),
    interpolation=cv2.INTER_NEAREST,
  )
  return np.concatenate([before, after, scaled], axis=1)


def pixel_sheet(rows: list[np.ndarray], width: int = 1024, max_width: int = 2048) -> np.ndarray:
  """Stacks rows vertically, each enlarged by a whole factor (pixel repetition) to about `width`.

  Unlike `contact_sheet`, which resamples every row to one width, a row is only ever repeated
  pixel for pixel (a row wider than `max_width` is shrunk to it), so seams a pixel wide, such as
  Object Jitter's, stay visible. Narrower rows are padded with black on the right.
  """
  scaled = []
  for row in rows:
    if row.shape[1] > max_width:
      height = max(1, round(row.shape[0] * max_width / row.shape[1]))
      scaled.append(cv2.resize(row, (max_width, height), interpolation=cv2.INTER_AREA))
    else:
      factor = max(1, width // row.shape[1])
      scaled.append(np.repeat(np.repeat(row, factor, axis=0), factor, axis=1))
  sheet_width = max(row.shape[1] for row in scaled)
  return np.concatenate(
    [np.pad(row, ((0, 0), (0, sheet_width - row.shape[1]), (0, 0))) for row in scaled], axis=0
  )
