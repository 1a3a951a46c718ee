"""SDG segmentation: an (authentic, forged) pair whose forged image holds an object pasted from
the authentic one (a "shared donor group" pair, not pixel-aligned) in; where the shared content
lies in each image out. The task of SACM, CAAA's annotator of SDG pairs.

Batch: {'authentic', 'forged': uint8 (B, S, S, 3), 'donor_mask': uint8 (B, S, S) labels of the
authentic image (the donor object), 'mask': uint8 (B, S, S) labels of the forged image (the
pasted object)}, labels {0, 1, IGNORE_LABEL}. The two images are not aligned, so each gets its
own geometric draw (resize, crop, flips, rot90; shared with its own mask) and its own JPEG and
RGB-shift draws. A source without donor masks (real pairs, `pairs:`) trains the forged image
only: its donor labels are all IGNORE_LABEL, as the official script weighs the authentic image's
terms by 0 on real pairs; a pair with has_mask False has its forged labels ignored too.

The model contract (SACM, Corr-DINO): `model(authentic=, forged=, train=)`, both images
normalised with ImageNet statistics in the compute dtype, returns a dict with at least
'forged_logits' and 'authentic_logits', (B, H, W, 2) logits (pristine, shared) at the input
resolution (any stride is resized to the labels), plus optional 'forged_aux' and
'authentic_aux' of the same kind (deep supervision).

Loss (loss section, SDGLossConfig): per image, the per-pixel loss (`name`: 'ce' as the official
recipe, or 'ohem'; optional Dice) of the final logits plus `aux_weight` (0.4) x that of the aux
logits; total = forged + authentic_weight x authentic.

Prediction and evaluation: the forged image's map, scored with the MIML protocol like
pair_segmentation (DenseTask, target 'forged'). Both images are resized to the training size
(input.augment.crop_size; SACM is built for one size) and the logits resized back to each
image's own size. When the evaluation source carries donor masks ('donor_mask', e.g. coco_sdg:)
the authentic image's map is scored as well: result['donor'] and 'donor_*' summary keys.
`miml-jax predict` writes both images' maps.

The official auto-annotation (Auto_Annotate_SDG.py: flips of the forged image only, logits
summed, keep iff QES > 0.5) is `miml-jax annotate --sdg` (annotate.py), which runs any model of
this task.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import config as config_lib
from miml_jax import losses
from miml_jax import metrics as metrics_lib
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models.layers import resize_bilinear
from miml_jax.tasks import base

ROLES = (("authentic", "donor_mask"), ("forged", "mask"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SDGLossConfig:
  """The `loss` section of the SDG task."""

  # Per-pixel loss of each output (losses.LOSSES): 'ce' is the official recipe's NLLLoss.
  name: str = config_lib.setting("ce", choices=losses.LOSSES)
  # Weight of each image's auxiliary logits (the official 0.4).
  aux_weight: float = config_lib.setting(0.4, ge=0)
  # Weight of the authentic image's terms relative to the forged one's (the official 1).
  authentic_weight: float = config_lib.setting(1.0, ge=0)
  ohem_thresh: float = config_lib.probability(0.7)
  ohem_min_kept: int = config_lib.setting(100_000, ge=0)
  # Each term becomes loss + dice_weight * Dice; 0 (the official recipe): none.
  dice_weight: float = config_lib.setting(0.0, ge=0)


class SDGSegmentationTask(base.DenseTask):
  name = "sdg_segmentation"
  fields = {
    "authentic": base.IMAGE,
    "forged": base.IMAGE,
    "donor_mask": base.MASK,
    "mask": base.MASK,
  }
  target_field = "forged"
  loss_schema = SDGLossConfig
  single_image = False
  # The model is built for one input size: no tiles, no downscaling.
  can_tile = False

  def check_sample(self, sample, where):
    # donor_mask is optional: real pairs have none (their donor labels are ignored).
    missing = [f for f in self.fields if f != "donor_mask" and f not in sample]
    if missing:
      raise UserInputError(
        f"{where}: task '{self.name}' needs (authentic, forged, mask[, donor_mask]) pairs, but "
        f"its examples lack {', '.join(missing)}; use a pair source such as coco_sdg:PATH or "
        f"pairs:PATH (docs/datasets.md)"
      )

  def train_transform(self, augment):
    def transform(element, rng):
      out = {"skipped": element.get("skipped", "")}
      for image_key, mask_key in ROLES:
        mask = element.get(mask_key)
        fields = {image_key: element[image_key]}
        kinds = {image_key: base.IMAGE}
        if mask is not None:
          fields[mask_key], kinds[mask_key] = mask, base.MASK
        # Each image with its own mask, on its own draw: the two are not aligned.
        drawn = transforms.augment_fields(fields, kinds, rng, augment)
        out[image_key] = drawn[image_key]
        ignored = mask is None or (mask_key == "mask" and element.get("has_mask") is False)
        out[mask_key] = (
          np.full(drawn[image_key].shape[:2], transforms.IGNORE_LABEL, np.uint8)
          if ignored
          else drawn[mask_key]
        )
      return out

    return transform

  def eval_inputs(self, sample, resize, pad_multiple):
    del resize, pad_multiple  # Every pair is scored at the training size.
    size = int(self.config.input.augment.crop_size)
    arrays = {}
    for key in ("authentic", "forged"):
      image = sample[key]
      arrays[key] = (
        image if image.shape[:2] == (size, size) else transforms.resize_image(image, (size, size))
      )
    meta = {
      "resized_hw": (size, size),
      "original_hw": sample["forged"].shape[:2],
      "authentic_hw": sample["authentic"].shape[:2],
    }
    return arrays, meta

  def model_inputs(self, batch):
    return {
      "authentic": transforms.normalize(batch["authentic"], self.dtype),
      "forged": transforms.normalize(batch["forged"], self.dtype),
    }

  def loss(self, outputs, batch):
    cfg = self.config.loss
    total, terms = 0.0, {}
    for role, mask_key in ROLES:
      labels = batch[mask_key]
      term = _pixel_loss(outputs[f"{role}_logits"], labels, cfg)
      terms[f"loss_{role}"] = term
      if outputs.get(f"{role}_aux") is not None:
        aux = _pixel_loss(outputs[f"{role}_aux"], labels, cfg)
        terms[f"loss_{role}_aux"] = aux
        term = term + cfg.aux_weight * aux
      total = total + (cfg.authentic_weight if role == "authentic" else 1.0) * term
    return total, terms

  def prediction_logits(self, outputs, inputs):
    return tampered_logit(outputs["forged_logits"], inputs["forged"].shape[1:3])

  def predict_outputs(self, outputs, inputs):
    result = super().predict_outputs(outputs, inputs)
    result["donor_logit"] = tampered_logit(
      outputs["authentic_logits"], inputs["authentic"].shape[1:3]
    )
    return result

  def finish(self, row, meta):
    prediction = super().finish(row, meta)
    donor = super().finish(
      {"logit": row["donor_logit"], "image_score": row["image_score"]},
      {"resized_hw": meta["resized_hw"], "original_hw": meta["authentic_hw"]},
    )
    prediction["donor_prob"] = donor["prob"]
    return prediction

  def write_prediction(self, out_dir, sample, prediction, threshold):
    from miml_jax import predict

    record = super().write_prediction(out_dir, sample, prediction, threshold)
    shown = {"id": f"{sample['id']}_donor", "image": sample["authentic"]}
    record["donor"] = predict.write_prediction(
      out_dir, shown, prediction["donor_prob"], float("nan"), threshold
    )
    return record

  def evaluate(self, predictor, source, **kwargs):
    donor = _DonorScores(predictor)
    result = super().evaluate(donor, source, **kwargs)
    if donor.scores is not None:
      summary = donor.scores.summary()
      result["donor"] = summary
      result["summary"].update({f"donor_{k}": summary[k] for k in ("iou", "f1", "pixel_auc")})
    return result

  def format_result(self, result):
    text = super().format_result(result)
    if "donor" in result:
      d = result["donor"]
      text += (
        f"\ndonor (authentic image): IoU {d['iou']:.4f}  F1 {d['f1']:.4f}  pixel AUC "
        f"{d['pixel_auc']:.4f}  ({d['num_images']} images)"
      )
    return text


class _DonorScores:
  """A Predictor seen by evaluate.evaluate, which also scores the authentic image's maps
  against the samples' donor masks (the MIML protocol's fixed 0.5, manipulated images only),
  in the same pass."""

  def __init__(self, predictor):
    self._predictor = predictor
    self.scores = None

  def __getattr__(self, name):
    return getattr(self._predictor, name)

  def predict(self, source, limit=None):
    for sample, prediction in self._predictor.predict(source, limit=limit):
      donor = sample.get("donor_mask")
      if donor is not None and np.any(donor > 0):
        if self.scores is None:
          self.scores = metrics_lib.MetricAccumulator()
        self.scores.add(prediction["donor_prob"], donor > 0, threshold=0.5, name=sample["id"])
      yield sample, prediction


def tampered_logit(logits: jax.Array, size) -> jax.Array:
  """(B, H, W) logit of 'shared' from two-class logits, resized to `size` (the two-class
  softmax is sigmoid(l1 - l0), so resizing the difference is exact)."""
  logits = logits.astype(jnp.float32)
  if tuple(logits.shape[1:3]) != tuple(size):
    logits = resize_bilinear(logits, tuple(size), align_corners=False)
  return logits[..., 1] - logits[..., 0]


def _pixel_loss(logits, labels, cfg):
  logits = logits.astype(jnp.float32)
  if logits.shape[1:3] != labels.shape[1:3]:
    logits = resize_bilinear(logits, labels.shape[1:3], align_corners=False)
  value = losses.LOSSES[cfg.name](logits, labels, cfg)
  if cfg.dice_weight:
    value = value + cfg.dice_weight * losses.dice_loss(logits, labels)
  return value
