"""Copy-move localisation with source / target discernment: one RGB image in, a 3-class map
(pristine / source / target) out. The task of BusterNet (models/busternet.py).

Batch: {'image': uint8 (B, S, S, 3), 'label': uint8 (B, S, S) in {0 pristine, 1 source,
2 target, IGNORE_LABEL}}. A training example carries 'mask' (the target: the pixels the copy
wrote) and 'source_mask' (where it was copied from), e.g. from `coco_copymove:PATH`; both get the
one geometric draw, then become the label: target where the target mask is set (the copy lies
on top), else source where the source mask is, else pristine, and IGNORE where either mask is
undecided (a soft edge) and the other does not decide it.
Model input: `x`, the image as the original's VGG "caffe" input (RGB -> BGR, minus the ImageNet
means); the model resizes it to its input_size itself.
Model output: 'logits' (B, S, S, 3) in busternet.CHANNELS order (target, source, pristine), and
in training the branches' auxiliary logits 'similarity_logits' / 'manipulation_logits'.
Loss (CopyMoveLossConfig): `fusion_weight` x the 3-class CE of the fused output, plus
`similarity_weight` x BCE of the similarity branch against every copy-move pixel (source or
target) and `manipulation_weight` x BCE of the manipulation branch against the target, each a
mean over the labelled pixels (the auxiliary tasks of the paper); optionally (`dice_weight`,
0 in the paper's recipe) a soft Dice of 1 - P(pristine) against every copy-move pixel. The
staged recipe (branches first, then the fusion with the branches frozen, `optim.frozen`) is two
configs of experiments/busternet.py.
Prediction (as the original's wrapper): the image resized to input_size x input_size (TF
bilinear, align_corners=True), the softmax resized back to the image's size the same way; 'prob'
= 1 - P(pristine) (the binary map every model is scored on), 'cmfd_mask' = P(pristine) <= 0.5
(the original's binary forgery mask), 'classes' = the per-pixel argmax as labels 0 / 1 / 2.
Evaluation: the MIML protocol on 'prob' against every copy-move pixel (source or target: the
binary ground truth), as every model is scored, plus BusterNet's own protocol (the release's
CASIA / CoMoFoD notebooks), `BusterNetScores`:
  protocol B    per positive image, precision / recall / F1 of 'cmfd_mask' against the binary
                ground truth (sklearn's binary scores: 0 when nothing is predicted), averaged;
  discernment   per image with both a source and a target region: each region's label is the
                class (source or target) the argmax gives most of its pixels (a tie goes to the
                target, the original's channel 0), or none when it gives neither; 'correct' is
                target -> target and source -> source, 'opt-in' any two different labels,
                'opt-out' one label for both, 'miss' a region labelled none. Accuracy is
                correct / all (the paper's overall) and correct / opt-in.
Sources without a 'source_mask' (a binary benchmark) are scored by the MIML protocol and
protocol B on their mask; they take no part in the discernment.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import losses
from miml_jax import metrics as metrics_lib
from miml_jax.config import setting
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models import busternet
from miml_jax.tasks import base

IGNORE = transforms.IGNORE_LABEL
CLASSES = ("pristine", "source", "target")  # The label values 0, 1, 2.
# label -> the model's output channel, and back.
_CHANNEL_OF_LABEL = np.asarray([busternet.CHANNELS.index(c) for c in CLASSES], np.int32)
_LABEL_OF_CHANNEL = np.asarray([CLASSES.index(c) for c in busternet.CHANNELS], np.uint8)
# The 3-class map as a picture, in the original's colours (its ground truth shown as RGB: red
# target, green source, blue pristine).
CLASS_COLOURS = np.asarray([(0, 0, 255), (0, 255, 0), (255, 0, 0)], np.uint8)
BUSTERNET_SCORES = (
  "cmfd_precision",
  "cmfd_recall",
  "cmfd_f1",
  "discern_accuracy",
  "discern_optin_accuracy",
)


@dataclasses.dataclass(frozen=True)
class CopyMoveLossConfig:
  """The `loss` section of the copy_move task (see the module docstring)."""

  fusion_weight: float = setting(1.0, ge=0)
  similarity_weight: float = setting(1.0, ge=0)
  manipulation_weight: float = setting(1.0, ge=0)
  # Not in the paper: soft Dice of the binary map 1 - P(pristine) against every copy-move pixel
  # (losses.soft_dice_loss). Without it a short run settles on the pristine prior.
  dice_weight: float = setting(0.0, ge=0)


def three_class_label(target: np.ndarray, source: np.ndarray) -> np.ndarray:
  """Decoded target and source labels ({0, 1, IGNORE} each) -> {0, 1 source, 2 target, IGNORE}."""
  label = np.zeros(target.shape, np.uint8)
  label[(target == IGNORE) | (source == IGNORE)] = IGNORE
  label[source == 1] = 1
  label[target == 1] = 2
  return label


class CopyMoveTask(base.DenseTask):
  name = "copy_move"
  fields = {"image": base.IMAGE, "mask": base.MASK, "source_mask": base.MASK}
  target_field = "image"
  loss_schema = CopyMoveLossConfig
  summary_scores = (*metrics_lib.SUMMARY_SCORES, *BUSTERNET_SCORES)
  plot_scores = ("iou", "f1", "cmfd_f1", "discern_accuracy")
  # The model sees every image at its input_size: nothing to tile or downscale.
  can_tile = False
  picture_names = ("source (green) / target (red)",)

  def __init__(self, config):
    super().__init__(config)
    self.input_size = int(config.model.get("input_size", 256))
    loss = config.get("loss") or {}
    aux = [k for k in ("similarity_weight", "manipulation_weight") if loss.get(k, 1.0) > 0]
    if aux and not config.model.get("aux_heads", True):
      raise UserInputError(
        f"loss.{aux[0]}: the branches' auxiliary losses need model.aux_heads=True (or set "
        f"{' and '.join('loss.' + k + '=0' for k in aux)})"
      )

  def check_sample(self, sample, where):
    if "image" in sample and "mask" in sample and "source_mask" not in sample:
      raise UserInputError(
        f"{where}: task '{self.name}' needs each copy-move's source region ('source_mask') as "
        "well as its target ('mask'); coco_copymove:PATH has both (the embedded synthetic set "
        "and binary datasets mark only the target)"
      )
    super().check_sample(sample, where)

  # ---- data -----------------------------------------------------------------------------
  def train_transform(self, augment):
    fields = self.fields

    def transform(element, rng):
      out = transforms.augment_fields({k: element[k] for k in fields}, fields, rng, augment)
      label = three_class_label(out["mask"], out["source_mask"])
      return {"image": out["image"], "label": label, "skipped": element.get("skipped", "")}

    return transform

  def eval_inputs(self, sample, resize, pad_multiple):
    """The image resized to input_size x input_size as the original does (TF bilinear,
    align_corners=True, in float); `resize` and the padding do not apply (input_size is a
    multiple of 32)."""
    del resize, pad_multiple
    image = sample["image"]
    size = (self.input_size, self.input_size)
    return (
      {"image": busternet.resize_align_corners_np(image, size)},
      {"original_hw": image.shape[:2]},
    )

  # ---- model ----------------------------------------------------------------------------
  def example_batch(self, batch_size, size):
    return {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((batch_size, size, size), jnp.uint8),
    }

  def random_batch(self, rng, batch_size, size):
    return {
      "image": rng.integers(0, 256, (batch_size, size, size, 3)).astype(np.uint8),
      "label": rng.integers(0, len(CLASSES), (batch_size, size, size)).astype(np.uint8),
    }

  def model_inputs(self, batch):
    return {"x": busternet.caffe_preprocess(batch["image"]).astype(self.dtype)}

  def loss(self, outputs, batch):
    cfg = self.config.loss
    label = batch["label"].astype(jnp.int32)
    valid = label != IGNORE
    count = jnp.maximum(jnp.sum(valid), 1)
    known = jnp.where(valid, label, 0)
    channel = jnp.asarray(_CHANNEL_OF_LABEL)[known]
    log_probs = jax.nn.log_softmax(outputs["logits"].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, channel[..., None], axis=-1)[..., 0]
    terms = {"loss_fusion": jnp.sum(jnp.where(valid, nll, 0.0)) / count}
    total = cfg.fusion_weight * terms["loss_fusion"]
    if cfg.dice_weight > 0:
      pristine = jnp.exp(log_probs[..., busternet.CHANNELS.index("pristine")])
      terms["loss_dice"] = losses.soft_dice_loss(1.0 - pristine, known > 0, valid)
      total = total + cfg.dice_weight * terms["loss_dice"]
    aux = (
      ("similarity", "similarity_logits", known > 0, cfg.similarity_weight),
      ("manipulation", "manipulation_logits", known == 2, cfg.manipulation_weight),
    )
    for name, key, positive, weight in aux:
      if weight <= 0:
        continue
      logit = outputs[key][..., 0].astype(jnp.float32)
      # BCE with logits: softplus(l) - l * y, stable for either sign.
      bce = jax.nn.softplus(logit) - logit * positive.astype(jnp.float32)
      terms[f"loss_{name}"] = jnp.sum(jnp.where(valid, bce, 0.0)) / count
      total = total + weight * terms[f"loss_{name}"]
    return total, terms

  # ---- prediction -----------------------------------------------------------------------
  def predict_outputs(self, outputs, inputs):
    probs = jax.nn.softmax(outputs["logits"].astype(jnp.float32), axis=-1)
    return {"probs": probs, "image_score": jnp.full((probs.shape[0],), jnp.nan)}

  def finish(self, row, meta):
    """The softmax resized back to the image's size (align_corners=True, as the original's
    ResizeBack), then the binary map, the original's mask and the 3-class labels."""
    probs = busternet.resize_align_corners_np(row["probs"], meta["original_hw"])
    pristine = probs[..., busternet.CHANNELS.index("pristine")]
    return {
      "prob": (np.float32(1.0) - pristine).astype(np.float32),
      "image_score": float(row["image_score"]),
      "cmfd_mask": pristine <= 0.5,
      "classes": _LABEL_OF_CHANNEL[np.argmax(probs, axis=-1)],
    }

  def prediction_pictures(self, prediction):
    return [CLASS_COLOURS[prediction["classes"]]]

  def write_prediction(self, out_dir, sample, prediction, threshold):
    record = super().write_prediction(out_dir, sample, prediction, threshold)
    stem = os.path.splitext(os.path.basename(sample["id"]))[0]
    path = os.path.join(out_dir, f"{stem}_classes.png")
    from miml_jax import io

    (classes,) = self.prediction_pictures(prediction)
    io.write_image(path, classes)
    record["files"]["classes"] = path
    for value, name in enumerate(CLASSES[1:], start=1):
      record[f"{name}_fraction"] = float(np.mean(prediction["classes"] == value))
    return record

  def describe_prediction(self, record):
    return (
      f"{record['image']}: {100 * record['tampered_fraction']:.1f}% copy-move at "
      f"{record['threshold']:.3g} (source {100 * record['source_fraction']:.1f}%, target "
      f"{100 * record['target_fraction']:.1f}%) -> {record['files']['classes']}"
    )

  # ---- evaluation -----------------------------------------------------------------------
  def evaluate(self, predictor, source, **kwargs):
    from miml_jax import evaluate

    scores = BusterNetScores()
    result = evaluate.evaluate(
      _Recording(predictor, scores.add),
      self.config,
      _BinaryTruth(source),
      image_field="image",
      **kwargs,
    )
    result["summary"].update(scores.summary())
    result["busternet"] = scores.details()
    return result

  def format_result(self, result):
    from miml_jax import evaluate

    s, d = result["summary"], result["busternet"]
    return "\n".join(
      [
        evaluate.format_table(result),
        f"BusterNet protocol B ({d['num_positive']} positive images): precision "
        f"{s['cmfd_precision']:.4f}  recall {s['cmfd_recall']:.4f}  F1 {s['cmfd_f1']:.4f}",
        f"discernment ({d['total']} images with source and target): accuracy "
        f"{s['discern_accuracy']:.4f}  opt-in accuracy {s['discern_optin_accuracy']:.4f}  "
        f"(correct {d['correct']}, swapped {d['swapped']}, opt-out {d['opt_out']}, "
        f"miss {d['miss']})",
      ]
    )

  def summary_line(self, summary):
    return (
      f"IoU {summary['iou']:.4f}  F1 {summary['f1']:.4f}  pixel AUC {summary['pixel_auc']:.4f}"
      f"  protocol-B F1 {summary['cmfd_f1']:.4f}  discernment {summary['discern_accuracy']:.4f}"
      f"  ({summary['num_images']} images"
    )


# ---- BusterNet's protocol -----------------------------------------------------------------
def protocol_b(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
  """(precision, recall, F1) of binary maps, as sklearn's precision_recall_fscore_support
  (average='binary') gives them: 0 for a ratio whose denominator is 0."""
  predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
  tp = int(np.count_nonzero(predicted & truth))
  fp = int(np.count_nonzero(predicted & ~truth))
  fn = int(np.count_nonzero(~predicted & truth))
  precision = tp / (tp + fp) if tp + fp else 0.0
  recall = tp / (tp + fn) if tp + fn else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def region_label(classes: np.ndarray, region: np.ndarray) -> str:
  """The class the 3-class labels give most of `region`'s pixels among source and target, a
  tie going to the target (the original's channel 0); 'none' when they give neither."""
  inside = classes[np.asarray(region, bool)]
  source, target = int(np.count_nonzero(inside == 1)), int(np.count_nonzero(inside == 2))
  if source + target == 0:
    return "none"
  return "target" if target >= source else "source"


def discernment(classes: np.ndarray, source: np.ndarray, target: np.ndarray) -> str:
  """One image's outcome: 'correct', 'swapped' (opt-in, wrong way round), 'opt_out' (one label
  for both regions) or 'miss' (a region labelled none)."""
  on_source, on_target = region_label(classes, source), region_label(classes, target)
  if "none" in (on_source, on_target):
    return "miss"
  if on_source == on_target:
    return "opt_out"
  return "correct" if on_target == "target" else "swapped"


class BusterNetScores:
  """Accumulates protocol B and the discernment over (sample, prediction) pairs."""

  OUTCOMES = ("correct", "swapped", "opt_out", "miss")

  def __init__(self):
    self.prf: list[tuple[float, float, float]] = []
    self.outcomes: list[dict] = []

  def add(self, sample: dict, prediction: dict):
    truth = sample["mask"] > 0  # The binary ground truth (_BinaryTruth: source or target).
    if truth.any():
      self.prf.append(protocol_b(prediction["cmfd_mask"], truth))
    if "source_mask" in sample:
      source, target = sample["source_mask"] > 0, sample["target_mask"] > 0
      if source.any() and target.any():
        outcome = discernment(prediction["classes"], source, target)
        self.outcomes.append({"id": sample["id"], "outcome": outcome})

  def details(self) -> dict:
    counts = {k: sum(r["outcome"] == k for r in self.outcomes) for k in self.OUTCOMES}
    return {"num_positive": len(self.prf), "total": len(self.outcomes), **counts}

  def summary(self) -> dict:
    d = self.details()
    prf = np.asarray(self.prf, np.float64).reshape(-1, 3)
    means = prf.mean(axis=0) if len(prf) else np.full(3, np.nan)
    opt_in = d["correct"] + d["swapped"]
    return {
      "cmfd_precision": float(means[0]),
      "cmfd_recall": float(means[1]),
      "cmfd_f1": float(means[2]),
      "discern_accuracy": d["correct"] / d["total"] if d["total"] else float("nan"),
      "discern_optin_accuracy": d["correct"] / opt_in if opt_in else float("nan"),
    }


class _BinaryTruth:
  """A source whose samples' 'mask' is every copy-move pixel (source or target), the binary
  ground truth; the target mask is kept as 'target_mask'."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    sample = dict(self._source[index])
    if "source_mask" in sample:
      sample["target_mask"] = sample["mask"]
      sample["mask"] = np.maximum(sample["mask"], sample["source_mask"])
    return sample

  def __getattr__(self, name):
    if name == "_source":  # Not set yet (a copy in the making): no recursion.
      raise AttributeError(name)
    return getattr(self._source, name)


class _Recording:
  """A predictor (delegated to) that hands every (sample, prediction) to `callback` too."""

  def __init__(self, predictor, callback):
    self._predictor, self._callback = predictor, callback

  def __getattr__(self, name):
    if name == "_predictor":
      raise AttributeError(name)
    return getattr(self._predictor, name)

  def predict(self, source, limit=None):
    for sample, prediction in self._predictor.predict(source, limit=limit):
      self._callback(sample, prediction)
      yield sample, prediction
