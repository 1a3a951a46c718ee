"""Single-image manipulation localisation: one RGB image in, a two-class mask (tampered /
pristine) and optionally an image-level score out. The task of Web-IML and APSC-Net.

Batch: {'image': uint8 (B, S, S, 3), 'label': uint8 (B, S, S) in {0, 1, IGNORE_LABEL}}.
Model: `model(x=normalised image, train)` -> {'logits' (B, h, w, 2) at any stride, 'aux': the
deep-supervision logits, 'image_logits': (B, 2) or None}.
Loss: losses.segmentation_loss over the final and auxiliary logits, plus `loss.image_weight` x
the image head's CE (an image counts as tampered when any pixel is).
Prediction: 'prob' = P(tampered) per pixel at the image's own size, 'image_score'.
Evaluation: the MIML protocol and the other named conventions (evaluate.py).
"""

import jax
import jax.numpy as jnp

from miml_jax import losses
from miml_jax.input import transforms
from miml_jax.models.layers import resize_bilinear
from miml_jax.tasks import base


class SegmentationTask(base.DenseTask):
  name = "segmentation"
  fields = {"image": base.IMAGE, "mask": base.MASK}
  target_field = "image"
  loss_schema = losses.SegmentationLossConfig

  def train_transform(self, augment):
    return train_transform(augment)

  def example_batch(self, batch_size, size):
    return {
      "image": jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8),
      "label": jax.ShapeDtypeStruct((batch_size, size, size), jnp.uint8),
    }

  def model_inputs(self, batch):
    return {"x": transforms.normalize(batch["image"], self.dtype)}

  def loss(self, outputs, batch):
    return image_and_pixel_loss(outputs, batch["label"], self.config.loss)

  def prediction_logits(self, outputs, inputs):
    return segmentation_logit(outputs, inputs["image"].shape[1:3])


def segmentation_logit(outputs: dict, size) -> jax.Array:
  """(B, H, W) logit of 'tampered' from a two-class model's final logits, at `size`."""
  logits = outputs["logits"].astype(jnp.float32)
  # Upsample to the padded input size with mmseg's resize (align_corners=False); the
  # two-class softmax is sigmoid(l1 - l0), so resizing the difference is exact.
  logits = resize_bilinear(logits, size, align_corners=False)
  return logits[..., 1] - logits[..., 0]


def train_transform(augment: transforms.AugmentConfig):
  """The segmentation example: the augmented image and its decoded label."""

  def transform(element, rng):
    image, label = transforms.train_augment(element["image"], element["mask"], rng, augment)
    # What data.on_error='skip' replaced to produce this example ('' if nothing): the trainer
    # counts and reports it.
    return {"image": image, "label": label, "skipped": element.get("skipped", "")}

  return transform


def image_and_pixel_loss(outputs: dict, labels: jax.Array, loss_config):
  """The per-pixel loss (with deep supervision) plus the image head's term."""
  loss, terms = losses.segmentation_loss(outputs, labels, loss_config)
  # An image counts as tampered when any pixel is.
  image_labels = jnp.any(labels == 1, axis=(1, 2)).astype(jnp.int32)
  map_weight = loss_config.get("map_detection_weight", 0.0)
  if map_weight:
    topk = loss_config.get("map_detection_topk", 0.01)
    terms["loss_map_detection"] = losses.map_detection_loss(outputs["logits"], image_labels, topk)
    loss = loss + map_weight * terms["loss_map_detection"]
  if outputs.get("image_logits") is not None and loss_config.image_weight > 0:
    # The image head sees stop-gradient features (as in APSC-Net), so this term trains the head
    # alone.
    image_loss = jnp.mean(
      -jnp.take_along_axis(
        jax.nn.log_softmax(outputs["image_logits"].astype(jnp.float32)),
        image_labels[:, None],
        axis=1,
      )
    )
    terms["loss_image"] = image_loss
    loss = loss + loss_config.image_weight * image_loss
  return loss, terms
