"""Pair classification: an (authentic, forged) pair in; whether they share a source, whether
they are aligned (not cropped), and the crop box out. The task of CAAA's pair classifier, which
routes web pairs to an annotator.

Batch: {'authentic', 'forged': uint8 (B, S, S, 3), 'same_source', 'aligned': int32 (B,),
'box': float32 (B, 4)}. Each image is resized to S x S on its own (so the box is in normalised
coordinates); both get the same flips and quarter turns (the box moves with them) and their own
JPEG and RGB-shift draws. There are no crops, which would change what `aligned` means.
Model input: the two images normalised and stacked on channels, authentic first (6 channels).
Model output: 'logits' (B, 8): [0:2] same source, [2:4] aligned, [4:8] box (x0, y0, x1, y1).
Loss: CE(same source) + CE(aligned) + SmoothL1(box), each weighted (loss section); the aligned
and box terms only count on same-source pairs (a pair of two unrelated photos has neither an
alignment nor a crop to learn).
Prediction: 'same_source', 'aligned' (probabilities), 'box', and the route: 'spg' (same source,
aligned: an in-place edit, for DASS), 'spg_unaligned' (same source, cropped) or 'sdg'.
Evaluation: route accuracy (the headline), same-source and aligned accuracy, mean IoU of the
predicted crop boxes on cropped same-source pairs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.tasks import base

ROUTES = ("spg", "spg_unaligned", "sdg")


@dataclasses.dataclass(frozen=True)
class PairClassificationLossConfig:
  """The `loss` section of the pair classification task."""

  same_source_weight: float = 1.0
  aligned_weight: float = 1.0
  box_weight: float = 1.0
  # SmoothL1's beta: 1/4096, the official classifier's (close to L1 on normalised boxes).
  box_beta: float = 1.0 / 4096


class PairClassificationTask(base.Task):
  name = "pair_classification"
  fields = {"authentic": base.IMAGE, "forged": base.IMAGE}
  labels = ("same_source", "aligned", "box")
  summary_scores = ("route_accuracy", "same_source_accuracy", "aligned_accuracy", "box_iou")
  plot_scores = summary_scores
  loss_schema = PairClassificationLossConfig
  single_image = False

  def check_sample(self, sample, where):
    super().check_sample(sample, where)
    missing = [k for k in self.labels if k not in sample]
    if missing:
      raise UserInputError(
        f"{where}: task '{self.name}' trains on labelled pairs (fields "
        f"{', '.join(self.labels)}; missing {', '.join(missing)}), e.g. "
        f"pair_synth:PHOTOS (docs/datasets.md)"
      )

  def train_transform(self, augment):
    def transform(element, rng):
      images = {key: _resized(element[key], augment.crop_size) for key in self.fields}
      labels = _label_arrays(element)
      images, labels["box"] = _flip_and_turn(images, labels["box"], rng, augment)
      out = {}
      for key in self.fields:
        image = images[key]
        if rng.random() < augment.jpeg_prob:
          image = transforms.jpeg_roundtrip(
            image, int(rng.integers(augment.jpeg_quality[0], augment.jpeg_quality[1] + 1))
          )
        if rng.random() < augment.rgb_shift_prob:
          shift = rng.integers(-augment.rgb_shift, augment.rgb_shift + 1, size=3)
          image = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
        out[key] = image
      out.update(labels)
      out["skipped"] = element.get("skipped", "")
      return out

    return transform

  def eval_inputs(self, sample, resize, pad_multiple):
    del resize, pad_multiple  # Every pair is scored at the training size.
    size = self.config.input.augment.crop_size
    return {k: _resized(sample[k], size) for k in self.fields}, None

  def example_batch(self, batch_size, size):
    spec = jax.ShapeDtypeStruct
    return {
      "authentic": spec((batch_size, size, size, 3), jnp.uint8),
      "forged": spec((batch_size, size, size, 3), jnp.uint8),
      "same_source": spec((batch_size,), jnp.int32),
      "aligned": spec((batch_size,), jnp.int32),
      "box": spec((batch_size, 4), jnp.float32),
    }

  def random_batch(self, rng, batch_size, size):
    batch = {
      k: rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8) for k in self.fields
    }
    batch["same_source"] = rng.integers(0, 2, batch_size).astype(np.int32)
    batch["aligned"] = rng.integers(0, 2, batch_size).astype(np.int32)
    corner = rng.uniform(0, 0.5, (batch_size, 2))
    batch["box"] = np.concatenate([corner, corner + 0.5], axis=1).astype(np.float32)
    return batch

  def model_inputs(self, batch):
    return {
      "x": jnp.concatenate(
        [
          transforms.normalize(batch["authentic"], self.dtype),
          transforms.normalize(batch["forged"], self.dtype),
        ],
        axis=-1,
      )
    }

  def loss(self, outputs, batch):
    cfg = self.config.loss
    logits = outputs["logits"].astype(jnp.float32)
    same = batch["same_source"].astype(jnp.int32)
    positive = same.astype(jnp.float32)
    same_ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, 0:2], same).mean()
    aligned_ce = optax.softmax_cross_entropy_with_integer_labels(
      logits[:, 2:4], batch["aligned"].astype(jnp.int32)
    )
    box_error = jnp.abs(logits[:, 4:8] - batch["box"])
    beta = cfg.box_beta
    box_l1 = jnp.where(box_error < beta, 0.5 * box_error**2 / beta, box_error - 0.5 * beta).mean(
      axis=1
    )
    count = jnp.maximum(positive.sum(), 1.0)
    aligned_ce = (aligned_ce * positive).sum() / count
    box_l1 = (box_l1 * positive).sum() / count
    terms = {"loss_same_source": same_ce, "loss_aligned": aligned_ce, "loss_box": box_l1}
    total = (
      cfg.same_source_weight * same_ce + cfg.aligned_weight * aligned_ce + cfg.box_weight * box_l1
    )
    return total, terms

  def predict_outputs(self, outputs, inputs):
    del inputs
    logits = outputs["logits"].astype(jnp.float32)
    return {
      "same_source": jax.nn.softmax(logits[:, 0:2])[:, 1],
      "aligned": jax.nn.softmax(logits[:, 2:4])[:, 1],
      "box": logits[:, 4:8],
    }

  def finish(self, row, meta):
    same, aligned = float(row["same_source"]), float(row["aligned"])
    return {
      "same_source": same,
      "aligned": aligned,
      "box": [float(v) for v in np.clip(row["box"], 0.0, 1.0)],
      "route": route(same, aligned),
    }

  def write_prediction(self, out_dir, sample, prediction, threshold):
    del out_dir, threshold  # The record is all there is: predictions.json holds it.
    return {"pair": sample["id"], **prediction}

  def describe_prediction(self, record):
    box = ", ".join(f"{v:.2f}" for v in record["box"])
    return (
      f"{record['pair']}: {record['route']} (same source {record['same_source']:.3f}, "
      f"aligned {record['aligned']:.3f}, crop box {box})"
    )

  def evaluate(self, predictor, source, limit=None, **unused):
    """Route, same-source and aligned accuracy and crop-box IoU over labelled pairs."""
    del unused  # Conventions and pictures are the dense tasks'.
    rows = []
    for sample, prediction in predictor.predict(source, limit=limit):
      self.check_sample(sample, "evaluation data")
      same, aligned = int(sample["same_source"]), int(sample["aligned"])
      truth = route(same, aligned)
      row = {
        "id": sample["id"],
        "route": truth,
        "predicted_route": prediction["route"],
        "same_source": same,
        "same_source_prob": prediction["same_source"],
        "aligned": aligned,
        "aligned_prob": prediction["aligned"],
      }
      if same and not aligned:
        row["box_iou"] = box_iou(prediction["box"], np.asarray(sample["box"], np.float64))
      rows.append(row)
    if not rows:
      raise UserInputError("evaluation data holds no pair")
    positives = [r for r in rows if r["same_source"]]
    boxes = [r["box_iou"] for r in rows if "box_iou" in r]
    summary = {
      "route_accuracy": float(np.mean([r["route"] == r["predicted_route"] for r in rows])),
      "same_source_accuracy": float(
        np.mean([(r["same_source_prob"] > 0.5) == bool(r["same_source"]) for r in rows])
      ),
      "aligned_accuracy": (
        float(np.mean([(r["aligned_prob"] > 0.5) == bool(r["aligned"]) for r in positives]))
        if positives
        else float("nan")
      ),
      "box_iou": float(np.mean(boxes)) if boxes else float("nan"),
      "num_pairs": len(rows),
      "route_counts": {name: sum(r["route"] == name for r in rows) for name in ROUTES},
    }
    # The majority route: what a classifier that always answers the same would score.
    majority = max(summary["route_counts"].values()) / len(rows)
    return {
      "summary": summary,
      "trivial": {"majority_route_accuracy": majority},
      "per_pair": rows,
      "unreadable_skipped": list(getattr(source, "skipped", [])),
    }

  def format_result(self, result):
    s = result["summary"]
    return "\n".join(
      [
        f"route accuracy {s['route_accuracy']:.4f} (majority route "
        f"{result['trivial']['majority_route_accuracy']:.4f})",
        f"same-source accuracy {s['same_source_accuracy']:.4f}  aligned accuracy "
        f"{s['aligned_accuracy']:.4f}  crop-box IoU {s['box_iou']:.4f}",
        f"{s['num_pairs']} pairs: " + ", ".join(f"{k} {v}" for k, v in s["route_counts"].items()),
      ]
    )

  def summary_line(self, summary):
    return (
      f"route acc {summary['route_accuracy']:.4f}  same-source acc "
      f"{summary['same_source_accuracy']:.4f}  aligned acc "
      f"{summary['aligned_accuracy']:.4f}  box IoU {summary['box_iou']:.4f}  "
      f"({summary['num_pairs']} pairs"
    )


def route(same_source: float, aligned: float) -> str:
  """CAAA's routing rule: same source and aligned -> 'spg', same source and not aligned ->
  'spg_unaligned', otherwise 'sdg'."""
  if same_source > 0.5:
    return "spg" if aligned > 0.5 else "spg_unaligned"
  return "sdg"


def box_iou(a, b) -> float:
  """IoU of two (x0, y0, x1, y1) boxes."""
  width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = width * height
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def _resized(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[:2] == (size, size):
    return image
  return transforms.resize_image(image, (size, size))


def _flip_and_turn(images: dict, box: np.ndarray, rng: np.random.Generator, augment):
  """The same flips and quarter turns for both images, with the box moved along (in
  normalised (x0, y0, x1, y1) coordinates); alignment and source are unchanged by them."""
  x0, y0, x1, y1 = (float(v) for v in box)
  if rng.random() < augment.hflip:
    images = {k: v[:, ::-1] for k, v in images.items()}
    x0, x1 = 1.0 - x1, 1.0 - x0
  if rng.random() < augment.vflip:
    images = {k: v[::-1] for k, v in images.items()}
    y0, y1 = 1.0 - y1, 1.0 - y0
  if rng.random() < augment.rot90:
    for _ in range(int(rng.integers(1, 4))):
      # np.rot90 turns counter-clockwise: the pixel at (x, y) moves to (y, 1 - x).
      images = {k: np.rot90(v) for k, v in images.items()}
      x0, y0, x1, y1 = y0, 1.0 - x1, y1, 1.0 - x0
  images = {k: np.ascontiguousarray(v) for k, v in images.items()}
  return images, np.asarray([x0, y0, x1, y1], np.float32)


def _label_arrays(element: dict) -> dict:
  return {
    "same_source": np.int32(element["same_source"]),
    "aligned": np.int32(element["aligned"]),
    "box": np.asarray(element["box"], np.float32).reshape(4),
  }
