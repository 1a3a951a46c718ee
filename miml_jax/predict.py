"""Inference: samples in, the task's named predictions (per-pixel probability maps at each
image's own size, scores) out.

The task (tasks/) turns each sample into the model's inputs: for the dense tasks every image is
optionally resized by the MIML test-time rule first (transforms.test_size), then padded to a
multiple of 32 (never cropped); samples are grouped into fixed-size batches per input shape, so
each shape compiles once, and the task maps each prediction back (for maps: logits cropped,
resized to the original size, and only then made probabilities, as the official scripts do).

    miml-jax predict photo.jpg more/ --checkpoint W --out predictions/
"""

import json
import os

import jax
import numpy as np

from miml_jax import io, sharding, tasks, visualize
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline, transforms


class Predictor:
  """Runs a model over samples of any size through its task; see the module docstring."""

  def __init__(
    self, model, variables, config, *, batch_size: int = 1, resize: str = "none", mesh=None
  ):
    transforms.test_size(1, 1, False, resize)  # A bad rule is an error before compiling.
    self.task = tasks.build(config)
    self.batch_size = batch_size
    self.resize = resize
    # Padding granularity: 32 (the model's stride) by default; eval.pad_multiple = 128 or 256
    # gives data of many sizes fewer shapes to compile, at the cost of more padding.
    self.pad_multiple = int(config.eval.pad_multiple)
    if self.pad_multiple < 32 or self.pad_multiple % 32:
      raise UserInputError(
        f"eval.pad_multiple={self.pad_multiple}: expected a multiple of 32 "
        f"(the model's output stride)"
      )
    self.mesh = mesh
    task = self.task

    def infer(variables, inputs):
      outputs = model.apply(variables, **task.model_inputs(inputs), train=False)
      return task.predict_outputs(outputs, inputs)

    self._put = lambda inputs: inputs
    if mesh is not None:
      # Inference replicates the weights (gathering FSDP shards once) and splits each batch over
      # every device of the mesh, all processes included: each process reads the same batches,
      # contributes the rows of its own devices, and gets the (replicated) predictions back.
      self.batch_size = -(-batch_size // mesh.size) * mesh.size  # Rows beyond are padding.
      rows = sharding.batch_sharding(mesh)
      self._put = lambda inputs: {
        k: jax.make_array_from_callback(v.shape, rows, lambda index, v=v: v[index])
        for k, v in inputs.items()
      }
      self._infer = jax.jit(
        infer,
        in_shardings=(sharding.replicated(mesh), rows),
        out_shardings=sharding.replicated(mesh),
      )
    else:
      self._infer = jax.jit(infer)
    self.set_variables(variables)

  def set_variables(self, variables):
    """New weights for the same model (the trainer's periodic evaluation): no recompilation.

    None drops the (replicated) copy, e.g. between evaluations of a run that shards its weights.
    """
    self.variables = (
      sharding.replicate(variables, self.mesh)
      if self.mesh is not None and variables is not None
      else variables
    )

  def predict(self, source, limit: int | None = None):
    """Yields (sample, prediction) in source order within each input shape: the source's
    record and the task's named outputs for it (dense tasks: 'prob' (H, W) float32 at the
    image's own size, 'image_score' float or nan)."""
    task = self.task

    def prepare(sample):
      return task.eval_inputs(sample, self.resize, self.pad_multiple)

    for batch in pipeline.eval_batches(
      source, self.batch_size, self.pad_multiple, limit=limit, prepare=prepare
    ):
      inputs = {k: v for k, v in batch.items() if k not in ("valid", "samples", "metas")}
      outputs = jax.device_get(self._infer(self.variables, self._put(inputs)))
      for row, (sample, meta) in enumerate(zip(batch["samples"], batch["metas"])):
        yield sample, task.finish({k: v[row] for k, v in outputs.items()}, meta)


class ImageFiles:
  """A source over image paths (no masks), for `predict`."""

  def __init__(self, paths: list[str]):
    self.paths = paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    path = self.paths[index]
    return {
      "image": io.read_image(path),
      "id": path,
      "is_jpeg": path.lower().endswith((".jpg", ".jpeg")),
    }

  def stems(self) -> list[str]:
    return [os.path.splitext(os.path.basename(p))[0] for p in self.paths]


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


def write_prediction(
  out_dir: str, sample: dict, prob: np.ndarray, image_prob: float, threshold: float
) -> dict:
  """Writes <stem>_heatmap.png, <stem>_overlay.png and <stem>_mask.png; returns the record."""
  stem = os.path.splitext(os.path.basename(sample["id"]))[0]
  os.makedirs(out_dir, exist_ok=True)
  files = {
    "heatmap": f"{stem}_heatmap.png",
    "overlay": f"{stem}_overlay.png",
    "mask": f"{stem}_mask.png",
  }
  visualize.save(os.path.join(out_dir, files["heatmap"]), visualize.heatmap(prob))
  visualize.save(os.path.join(out_dir, files["overlay"]), visualize.overlay(sample["image"], prob))
  visualize.save(os.path.join(out_dir, files["mask"]), ((prob > threshold) * 255).astype(np.uint8))
  record = {
    "image": sample["id"],
    "height": int(prob.shape[0]),
    "width": int(prob.shape[1]),
    "tampered_fraction": float((prob > threshold).mean()),
    "max_probability": float(prob.max()),
    "threshold": threshold,
    "files": {k: os.path.join(out_dir, v) for k, v in files.items()},
  }
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
