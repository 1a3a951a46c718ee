"""Pair segmentation (constrained IML): an (authentic, forged) pair in, the mask of the edit in
the forged image out. The task of DASS, CAAA's annotator of in-place edits (SPG pairs).

Batch: {'authentic', 'forged': uint8 (B, S, S, 3), 'mask': uint8 (B, S, S) labels {0, 1,
IGNORE_LABEL}}. Both images get one geometric draw (they stay pixel-aligned) and their own JPEG
and RGB-shift draws: web pairs are compressed independently, so a difference map must learn to
look past recompression. A pair whose images differ in size has its authentic image resized to
the forged one's first (DASS resizes both to one size).
Model input: 9 channels, [authentic, forged, |authentic - forged|]: the images normalised with
ImageNet statistics, the difference computed in float (never on uint8, which wraps around) and
divided by the ImageNet std, so it is on the images' scale.
Loss, prediction and evaluation: those of single-image segmentation, on the forged image (the
MIML protocol scores the predicted map of the forged image against its mask).
"""

import jax.numpy as jnp

from miml_jax import losses
from miml_jax.input import transforms
from miml_jax.tasks import base
from miml_jax.tasks.segmentation import image_and_pixel_loss, segmentation_logit


class PairSegmentationTask(base.DenseTask):
  name = "pair_segmentation"
  fields = {"authentic": base.IMAGE, "forged": base.IMAGE, "mask": base.MASK}
  target_field = "forged"
  loss_schema = losses.SegmentationLossConfig
  single_image = False

  def train_transform(self, augment):
    fields = self.fields

    def transform(element, rng):
      pair = _aligned(element)
      out = transforms.augment_fields({k: pair[k] for k in fields}, fields, rng, augment)
      out["skipped"] = element.get("skipped", "")
      return out

    return transform

  def eval_inputs(self, sample, resize, pad_multiple):
    return super().eval_inputs(_aligned(sample), resize, pad_multiple)

  def model_inputs(self, batch):
    authentic = batch["authentic"].astype(jnp.float32)
    forged = batch["forged"].astype(jnp.float32)
    std = jnp.asarray(transforms.IMAGENET_STD, jnp.float32)
    difference = jnp.abs(authentic - forged) / std
    stacked = jnp.concatenate(
      [transforms.normalize(batch["authentic"]), transforms.normalize(batch["forged"]), difference],
      axis=-1,
    )
    return {"x": stacked.astype(self.dtype)}

  def loss(self, outputs, batch):
    return image_and_pixel_loss(outputs, batch["mask"], self.config.loss)

  def prediction_logits(self, outputs, inputs):
    return segmentation_logit(outputs, inputs["forged"].shape[1:3])


def _aligned(sample: dict) -> dict:
  """The pair with its authentic image resized to the forged image's size, if they differ."""
  height, width = sample["forged"].shape[:2]
  if sample["authentic"].shape[:2] == (height, width):
    return sample
  return dict(sample, authentic=transforms.resize_image(sample["authentic"], (height, width)))
