"""Inference: samples in, the task's named predictions (per-pixel probability maps at each
image's own size, scores) out.

The task (tasks/) turns each sample into the model's inputs: for the dense tasks every image is
resized by the MIML test-time rule first (transforms.test_size; eval.resize 'miml', or 'none'),
then padded to a multiple of 32 (never cropped); samples are grouped into batches of a fixed
number of rows per input shape, so each shape compiles once, and the task maps each prediction
back (for maps: logits cropped, resized to the original size, and only then made
probabilities, as the official scripts do).

Memory is bounded whatever the image size. A batch holds at most eval.max_batch_pixels padded
pixels per device (rows per shape = min(batch_size, max_batch_pixels // (H x W))). An image
whose padded size alone is over it is, for the dense tasks, cut into overlapping tiles of
eval.tile_size^2 (tile_grid), predicted in batches of tiles of one shape, and its logits blended
back into one map before `finish` (eval.large_image='tile'), or resized to fit
(eval.large_image='downscale'). Images over data.max_image_pixels are refused from their file
header, before they are decoded (io.image_pixel_limit).

    miml-jax predict photo.jpg more/ --checkpoint W --out predictions/
"""

import dataclasses
import json
import os

import jax
import numpy as np

from miml_jax import io, sharding, tasks, visualize
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline, transforms
from miml_jax.models import layers
from miml_jax.tasks.base import config_setting

_BATCH_KEYS = ("valid", "samples", "metas", "parts")


class Predictor:
  """Runs a model over samples of any size through its task; see the module docstring.

  resize: the test-time rule ('miml' or 'none'); None: the config's eval.resize.
  """

  def __init__(
    self, model, variables, config, *, batch_size: int = 1, resize: str | None = None, mesh=None
  ):
    if resize is None:
      resize = config_setting(config, "eval", "resize")
    transforms.test_size(1, 1, False, resize)  # A bad rule is an error before compiling.
    self.task = tasks.build(config)
    self.batch_size = batch_size
    self.resize = resize
    # Per device: the padded pixels of one batch; larger images are tiled or downscaled.
    self.max_batch_pixels = int(config_setting(config, "eval", "max_batch_pixels"))
    self.large_image = config_setting(config, "eval", "large_image")
    self.tile_size = int(config_setting(config, "eval", "tile_size"))
    self.tile_overlap = int(config_setting(config, "eval", "tile_overlap"))
    self.max_image_pixels = int(config_setting(config, "data", "max_image_pixels"))
    if self.tile_size % 32 or self.tile_size**2 > self.max_batch_pixels:
      raise UserInputError(
        f"eval.tile_size={self.tile_size}: expected a multiple of 32 whose square is at most "
        f"eval.max_batch_pixels={self.max_batch_pixels}"
      )
    # Padding granularity: 32 (the model's stride) by default; eval.pad_multiple = 128 or 256
    # gives data of many sizes fewer shapes to compile, at the cost of more padding.
    self.pad_multiple = int(config.eval.pad_multiple)
    if self.pad_multiple < 32 or self.pad_multiple % 32:
      raise UserInputError(
        f"eval.pad_multiple={self.pad_multiple}: expected a multiple of 32 "
        f"(the model's output stride)"
      )
    self.mesh = mesh
    self.devices = 1 if mesh is None else mesh.size
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
        compiler_options=layers.compiler_options(),
      )
    else:
      self._infer = jax.jit(infer, compiler_options=layers.compiler_options())
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
    image's own size, 'image_score' float or nan). Images are read under the config's
    data.max_image_pixels."""
    task = self.task
    tile = task.can_tile and self.large_image == "tile"

    def prepare(sample):
      arrays, meta = task.eval_inputs(sample, self.resize, self.pad_multiple)
      if tile and _pixels(arrays) > self.max_batch_pixels:
        height, width = next(iter(arrays.values())).shape[:2]
        grid = tile_grid(height, width, self.tile_size, self.tile_overlap)
        return task.tile_rows(arrays, grid), (meta, grid)
      return arrays, (meta, None)

    tiled = None
    with io.image_pixel_limit(self.max_image_pixels):
      for batch in pipeline.eval_batches(
        source,
        self.batch_size,
        self.pad_multiple,
        limit=limit,
        prepare=prepare,
        max_batch_pixels=self.max_batch_pixels,
        row_multiple=self.devices,
      ):
        inputs = {k: v for k, v in batch.items() if k not in _BATCH_KEYS}
        outputs = jax.device_get(self._infer(self.variables, self._put(inputs)))
        del inputs
        rows = zip(batch["samples"], batch["metas"], batch["parts"])
        for row, (sample, (meta, grid), (part, parts)) in enumerate(rows):
          values = {k: v[row] for k, v in outputs.items()}
          if grid is None:
            yield sample, task.finish(values, meta)
            continue
          if part == 0:
            tiled = task.tiled_prediction(grid)
          tiled.add(part, values)
          if part == parts - 1:
            merged, tiled = tiled.result(), None
            prediction = task.finish(merged, meta)
            del merged  # Only the map at the image's size lives on.
            yield sample, prediction


def _pixels(arrays: dict) -> int:
  """H x W of the largest array of a row."""
  return max(v.shape[0] * v.shape[1] for v in arrays.values() if v.ndim >= 2)


@dataclasses.dataclass(frozen=True)
class TileGrid:
  """Overlapping tiles covering a (height, width) input: windows [y, y + tile_h) x
  [x, x + tile_w) for y in ys and x in xs (row-major, `windows()`), and per start 1D blend
  weights (wy[i] for ys[i], wx[j] for xs[j]) that sum to 1 over the tiles at every position,
  so the 2D weights wy[i] (x) wx[j] do too."""

  height: int
  width: int
  tile_h: int
  tile_w: int
  ys: tuple[int, ...]
  xs: tuple[int, ...]
  wy: tuple[np.ndarray, ...]
  wx: tuple[np.ndarray, ...]

  def __len__(self) -> int:
    return len(self.ys) * len(self.xs)

  def windows(self) -> list[tuple[int, int]]:
    return [(y, x) for y in self.ys for x in self.xs]

  def weights(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    row, column = divmod(index, len(self.xs))
    return self.wy[row], self.wx[column]


def tile_grid(height: int, width: int, tile: int, overlap: int, stride: int = 32) -> TileGrid:
  """The tiles of a (height, width) padded input: tile x tile (or the whole side, if shorter),
  at multiples of `stride` (the model's output stride, so every tile sees the stride grid
  the whole image would), neighbours overlapping by at least `overlap`, the last flush with
  the end. Blend weights along each axis: at an inner tile edge the outer quarter of
  `overlap` gets weight 0 and the next half a linear ramp, normalised to sum to 1. A model
  whose receptive field reaches at most overlap / 4 pixels therefore gives, tiled, the logits
  it gives on the whole image (up to float rounding)."""
  (ys, wy), (xs, wx) = (_axis(n, tile, overlap, stride) for n in (height, width))
  return TileGrid(height, width, min(tile, height), min(tile, width), ys, xs, wy, wx)


def _axis(length: int, tile: int, overlap: int, stride: int):
  if length % stride or tile % stride or overlap % stride or 2 * overlap > tile:
    raise ValueError(f"tile_grid: {length=}, {tile=}, {overlap=} for stride {stride}")
  tile = min(tile, length)
  if tile == length:
    return (0,), (np.ones(tile, np.float32),)
  # Starts in units of the stride, spread evenly: each step at most (tile - overlap) / stride.
  span, step = (length - tile) // stride, (tile - overlap) // stride
  count = 1 + -(-span // step)
  starts = tuple(stride * (i * span // (count - 1)) for i in range(count))
  margin = overlap // 4
  ramp = overlap - 2 * margin
  up = (np.arange(ramp) + 0.5) / max(ramp, 1)
  raw = []
  for start in starts:
    weight = np.ones(tile)
    if start > 0:  # An inner edge on the left / top.
      weight[:margin] = 0
      weight[margin : margin + ramp] = up
    if start + tile < length:  # An inner edge on the right / bottom.
      weight[tile - margin :] = 0
      weight[tile - margin - ramp : tile - margin] = up[::-1]
    raw.append(weight)
  total = np.zeros(length)
  for start, weight in zip(starts, raw):
    total[start : start + tile] += weight
  assert total.min() > 0, (length, tile, overlap)
  return starts, tuple(
    (weight / total[start : start + tile]).astype(np.float32) for start, weight in zip(starts, raw)
  )


class ImageFiles:
  """A source over image paths (no masks), for `predict`."""

  def __init__(self, paths: list[str]):
    self.paths = paths

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, index):
    path = self.paths[index]
    return {
      "image": io.read_image(path),  # Under the predictor's data.max_image_pixels.
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
