"""Inference: images in, per-pixel tampering probability (at each image's own size) out.

Images are padded to a multiple of 32 (never cropped) and grouped into fixed-size batches per
padded shape, so each shape compiles once. Optionally the MIML test-time resize rule is applied
first (EVALUATION.md): area >= 1536^2 -> 976x976; area > 512^2 or not a JPEG -> native size;
otherwise (small JPEGs such as CASIA v1) -> 512x512. Logits are resized back to the original
size and only then turned into probabilities, as the official scripts do.

    miml-jax predict photo.jpg more/ --checkpoint W --out predictions/
"""

import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import io
from miml_jax import sharding
from miml_jax import visualize
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline
from miml_jax.input import transforms
from miml_jax.models.layers import resize_bilinear


def miml_test_size(height: int, width: int, is_jpeg: bool) -> tuple[int, int]:
  area = height * width
  if area >= 1536 * 1536:
    return 976, 976
  if area > 512 * 512 or not is_jpeg:
    return height, width
  return 512, 512


class Predictor:
  """Runs a model over images of any size; see the module docstring for the size rules."""

  def __init__(self, model, variables, config, *, batch_size: int = 1, resize: str = "none",
               mesh=None):
    if resize not in ("none", "miml"):
      raise UserInputError(f"resize '{resize}': expected 'none' or 'miml'")
    self.batch_size = batch_size
    self.resize = resize
    # Padding granularity: 32 (the model's stride) by default; eval.pad_multiple = 128 or 256
    # gives data of many sizes fewer shapes to compile, at the cost of more padding.
    self.pad_multiple = int(config.get("eval", {}).get("pad_multiple", 32))
    if self.pad_multiple < 32 or self.pad_multiple % 32:
      raise UserInputError(f"eval.pad_multiple={self.pad_multiple}: expected a multiple of 32 "
                           f"(the model's output stride)")
    self.mesh = mesh
    dtype = jnp.dtype(config.model.get("dtype", "float32"))

    def infer(variables, images):
      outputs = model.apply(variables, transforms.normalize(images, dtype), train=False)
      logits = outputs["logits"].astype(jnp.float32)
      # Upsample to the padded input size with mmseg's resize (align_corners=False); the
      # two-class softmax is sigmoid(l1 - l0), so resizing the difference is exact.
      logits = resize_bilinear(logits, images.shape[1:3], align_corners=False)
      delta = logits[..., 1] - logits[..., 0]
      image_logits = outputs.get("image_logits")
      image_prob = (jax.nn.softmax(image_logits.astype(jnp.float32))[:, 1]
                    if image_logits is not None else jnp.full(images.shape[:1], jnp.nan))
      return delta, image_prob

    self._put = lambda images: images
    if mesh is not None:
      # Inference replicates the weights (gathering FSDP shards once) and splits each batch over
      # every device of the mesh, all processes included: each process reads the same batches,
      # contributes the rows of its own devices, and gets the (replicated) predictions back.
      self.batch_size = -(-batch_size // mesh.size) * mesh.size  # Rows beyond are padding.
      rows = sharding.batch_sharding(mesh)
      self._put = lambda images: jax.make_array_from_callback(
          images.shape, rows, lambda index: images[index])
      self._infer = jax.jit(infer, in_shardings=(sharding.replicated(mesh), rows),
                            out_shardings=sharding.replicated(mesh))
    else:
      self._infer = jax.jit(infer)
    self.set_variables(variables)

  def set_variables(self, variables):
    """New weights for the same model (the trainer's periodic evaluation): no recompilation.

    None drops the (replicated) copy, e.g. between evaluations of a run that shards its weights.
    """
    self.variables = (sharding.replicate(variables, self.mesh)
                      if self.mesh is not None and variables is not None else variables)
  def _target_size(self, sample):
    height, width = sample["image"].shape[:2]
    if self.resize == "miml":
      return miml_test_size(height, width, sample.get("is_jpeg", False))
    return height, width

  def predict(self, source, limit: int | None = None):
    """Yields (sample, prob (H, W) float32, image_prob float or nan), samples in source order
    within each padded shape."""
    prepared = _Resized(source, self._target_size)
    for batch in pipeline.eval_batches(prepared, self.batch_size, self.pad_multiple,
                                       limit=limit):
      delta, image_prob = jax.device_get(
          self._infer(self.variables, self._put(batch["image"])))
      for row, sample in enumerate(batch["samples"]):
        height, width = sample["resized_hw"]
        d = delta[row, :height, :width]
        original_h, original_w = sample["original_hw"]
        if (height, width) != (original_h, original_w):
          d = cv2.resize(d, (original_w, original_h), interpolation=cv2.INTER_LINEAR)
        prob = 1.0 / (1.0 + np.exp(-d))
        sample = dict(sample, image=sample["original_image"])
        del sample["original_image"]
        yield sample, prob.astype(np.float32), float(image_prob[row])


class _Resized:
  """A source view whose images are resized to the test size (originals kept for scoring)."""

  def __init__(self, source, target_size):
    self._source, self._target_size = source, target_size

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    sample = self._source[index]
    if sample is None:  # Left out by data.on_error='skip'.
      return None
    sample = dict(sample)
    image = sample["image"]
    target = self._target_size(sample)
    sample["original_image"] = image
    sample["original_hw"] = image.shape[:2]
    sample["resized_hw"] = target
    if tuple(target) != image.shape[:2]:
      sample["image"] = cv2.resize(image, (target[1], target[0]), interpolation=cv2.INTER_LINEAR)
    return sample


class ImageFiles:
  """A source over image paths (no masks), for `predict`."""

  def __init__(self, paths: list[str]):
    self.paths = paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    path = self.paths[index]
    return {"image": io.read_image(path), "id": path,
            "is_jpeg": path.lower().endswith((".jpg", ".jpeg"))}


def expand_inputs(inputs: list[str]) -> list[str]:
  """Files stay, folders expand to the images inside them; errors name the missing path."""
  paths = []
  for item in inputs:
    if os.path.isdir(item):
      found = io.list_images(item)
      if not found:
        raise UserInputError(f"{item}: folder holds no images")
      paths.extend(found)
    elif os.path.isfile(item):
      paths.append(item)
    else:
      raise UserInputError(f"{item}: no such file or folder")
  return paths


def write_prediction(out_dir: str, sample: dict, prob: np.ndarray, image_prob: float,
                     threshold: float) -> dict:
  """Writes <stem>_heatmap.png, <stem>_overlay.png and <stem>_mask.png; returns the record."""
  stem = os.path.splitext(os.path.basename(sample["id"]))[0]
  os.makedirs(out_dir, exist_ok=True)
  files = {"heatmap": f"{stem}_heatmap.png", "overlay": f"{stem}_overlay.png",
           "mask": f"{stem}_mask.png"}
  visualize.save(os.path.join(out_dir, files["heatmap"]), visualize.heatmap(prob))
  visualize.save(os.path.join(out_dir, files["overlay"]), visualize.overlay(sample["image"], prob))
  visualize.save(os.path.join(out_dir, files["mask"]), ((prob > threshold) * 255).astype(np.uint8))
  record = {"image": sample["id"], "height": int(prob.shape[0]), "width": int(prob.shape[1]),
            "tampered_fraction": float((prob > threshold).mean()),
            "max_probability": float(prob.max()), "threshold": threshold,
            "files": {k: os.path.join(out_dir, v) for k, v in files.items()}}
  if not np.isnan(image_prob):
    record["image_score"] = image_prob
  return record


def refuse_overwrite(out_dir: str, stems: list[str]):
  """Never overwrite earlier predictions silently: a clash is an error naming the file."""
  for stem in stems:
    for suffix in ("_heatmap.png", "_overlay.png", "_mask.png"):
      path = os.path.join(out_dir, stem + suffix)
      if os.path.exists(path):
        raise UserInputError(f"{path}: exists; choose another --out or pass --overwrite")
  seen = set()
  for stem in stems:
    if stem in seen:
      raise UserInputError(f"two inputs are named '{stem}': their outputs would collide")
    seen.add(stem)


def dump_json(path: str, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
