"""The task contract: what a model family means, between data, model, loss, prediction and
evaluation.

The trainer, `Predictor`, `miml-jax eval` / `predict`, the demo and the benchmarks never read a
batch key or a model output themselves: they ask the task. A task answers, for one family:

  data        `fields`: the named image-like and mask-like fields a training example carries
              (the pipeline draws one geometric augmentation per sample and applies it to all of
              them); `train_transform(augment)`: the per-sample function the grain pipeline
              runs; `eval_inputs(sample, resize, pad_multiple)`: a test sample as host arrays.
  model       `example_batch(batch_size, size)`: shapes and dtypes of a training batch per field;
              `model_inputs(batch)`: how a batch becomes the model's keyword inputs, on device,
              in the compute dtype (normalisation, channel stacking, difference maps).
  loss        `loss(outputs, batch)`: (scalar, {named terms}); `loss_schema`: the dataclass
              of the config's `loss` section.
  update      `project(params)`: an optional projection after every optimiser update (for
              constrained kernels); the identity by default.
  prediction  `predict_outputs(outputs, inputs)` (on device) and `finish(row, meta)` (host):
              named probability maps at each input's own size and named scores.
  evaluation  `evaluate(predictor, source, ...)`: the result dict, with `summary` holding
              `summary_scores` (what `train.best_metric` may name); `format_result(result)`:
              the human table; `summary_line(summary)`: one log line.

A task is chosen by the config (`config.task`) and registered in tasks/__init__.py; a model
registers the task it is built for (models.MODELS) as the default. docs/architecture.md walks
through adding one.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from miml_jax import metrics as metrics_lib
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models.common import resolve_dtype

IMAGE = "image"  # uint8 RGB (H, W, 3): interpolated, photometric augmentation per image.
MASK = "mask"  # grey 0..255 (H, W): nearest resampling, decoded to {0, 1, ignore} labels.


class Task:
  """The base class: the parts most tasks share. Subclasses set the class attributes."""

  name: ClassVar[str]
  # field name -> IMAGE or MASK: what a training example carries and how it is augmented.
  fields: ClassVar[dict[str, str]]
  # The keys of result['summary'] that rank checkpoints (train.best_metric), best first.
  summary_scores: ClassVar[tuple[str, ...]]
  # The scores drawn in the workdir's curves.png.
  plot_scores: ClassVar[tuple[str, ...]]
  loss_schema: ClassVar[type]
  # Whether `miml-jax predict` / the demo take single images (else pairs).
  single_image: ClassVar[bool] = True
  # Whether an input too large for one batch can be cut into tiles (`tile_rows`,
  # `tiled_prediction`) or downscaled (`eval_inputs(..., max_pixels)`): the dense tasks.
  can_tile: ClassVar[bool] = False
  # Titles of the pictures of a prediction shown beside its probability map (the demo's
  # extra images, e.g. BusterNet's source / target map): `prediction_pictures` draws them.
  picture_names: ClassVar[tuple[str, ...]] = ()

  def __init__(self, config):
    self.config = config
    # The compute dtype the model was built with (its inputs are made in it).
    self.dtype = jnp.dtype(resolve_dtype(config.model.get("dtype", "float32")))

  # ---- data (host) -----------------------------------------------------------------------
  def check_sample(self, sample: dict, where: str):
    """A one-line error if a source's samples lack a field this task needs."""
    missing = [f for f in self.fields if f not in sample]
    if missing:
      have = ", ".join(k for k in sample if isinstance(sample[k], np.ndarray))
      raise UserInputError(
        f"{where}: task '{self.name}' needs the field(s) {', '.join(self.fields)}, but its "
        f"examples have {have or 'none'} (missing {', '.join(missing)}); use a source made "
        f"for this task (docs/datasets.md)"
      )

  def train_transform(self, augment: transforms.AugmentConfig):
    """The per-sample function (element, np.random.Generator) -> dict of arrays for grain."""
    fields = self.fields

    def transform(element, rng):
      out = transforms.augment_fields({k: element[k] for k in fields}, fields, rng, augment)
      out["skipped"] = element.get("skipped", "")
      return out

    return transform

  def eval_inputs(self, sample: dict, resize: str, pad_multiple: int):
    """(host arrays keyed like the model's batch, meta for `finish`) of one test sample."""
    raise NotImplementedError

  # ---- model ----------------------------------------------------------------------------
  def example_batch(self, batch_size: int, size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of a training batch (benchmarks make random batches from it)."""
    shapes = {IMAGE: (batch_size, size, size, 3), MASK: (batch_size, size, size)}
    return {k: jax.ShapeDtypeStruct(shapes[kind], jnp.uint8) for k, kind in self.fields.items()}

  def random_batch(self, rng: np.random.Generator, batch_size: int, size: int) -> dict:
    """A random batch of `example_batch`'s shapes: images 0..255, labels 0/1."""
    batch = {}
    for key, spec in self.example_batch(batch_size, size).items():
      high = 256 if self.fields.get(key) == IMAGE else 2
      batch[key] = rng.integers(0, high, spec.shape).astype(spec.dtype)
    return batch

  def model_inputs(self, batch: dict) -> dict:
    raise NotImplementedError

  # ---- loss and update ------------------------------------------------------------------
  def loss(self, outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def project(self, params):
    """Applied to the parameters after every optimiser update: the model's registered
    projection (models.ModelSpec.project, e.g. ManTra-Net's constrained kernels), else the
    identity."""
    from miml_jax import models

    model_config = self.config.get("model") or {}
    spec = models.MODELS.get(model_config.get("name"))
    projection = spec.project if spec is not None else None
    return params if projection is None else projection(model_config, params)

  # ---- prediction -----------------------------------------------------------------------
  def predict_outputs(self, outputs: dict, inputs: dict) -> dict:
    raise NotImplementedError

  def finish(self, row: dict, meta: Any) -> dict:
    """One example's prediction (host): `row` holds its slice of predict_outputs."""
    raise NotImplementedError

  def predict_inputs(self, paths: list[str]):
    """The source `miml-jax predict` reads from the user's paths (with a `stems()` method:
    the output names, one per example)."""
    from miml_jax import predict
    from miml_jax.input import pairs

    if self.single_image:
      return predict.ImageFiles(predict.expand_inputs(paths))
    return pairs.PairFolderSource.from_paths(paths)

  def prediction_pictures(self, prediction: dict) -> list[np.ndarray]:
    """uint8 RGB (H, W, 3) pictures of one finished prediction, one per `picture_names`."""
    del prediction
    return []

  def write_prediction(
    self, out_dir: str, sample: dict, prediction: dict, threshold: float | None
  ) -> dict:
    """Writes what `miml-jax predict` shows of one example; returns its JSON record."""
    raise NotImplementedError

  def describe_prediction(self, record: dict) -> str:
    """One line of `miml-jax predict`'s output."""
    raise NotImplementedError

  # ---- evaluation -----------------------------------------------------------------------
  def evaluate(self, predictor, source, **kwargs) -> dict:
    raise NotImplementedError

  def format_result(self, result: dict) -> str:
    raise NotImplementedError

  def summary_line(self, summary: dict) -> str:
    return "  ".join(f"{k} {summary[k]:.4f}" for k in self.summary_scores if k in summary)


class DenseTask(Task):
  """A task whose output is a per-pixel tampering map of one of its images, scored with the
  MIML protocol (evaluate.py): single-image segmentation, and pair segmentation (the map of the
  forged image given the pair)."""

  # The image the map belongs to (shown in pictures; its size is the map's size).
  target_field: ClassVar[str]
  summary_scores = metrics_lib.SUMMARY_SCORES
  plot_scores = ("iou", "f1", "pixel_auc")
  can_tile = True

  def eval_inputs(self, sample, resize, pad_multiple):
    """Every image field resized by the test-time rule (predict.test_size), then padded to
    a multiple of `pad_multiple` (never cropped); meta = (resized, original) sizes.

    With eval.large_image='downscale', an image whose padded size would be over
    eval.max_batch_pixels is resized further, keeping its aspect ratio, to the largest size
    whose padding fits (with 'tile' the Predictor cuts it into tiles instead)."""
    height, width = sample[self.target_field].shape[:2]
    target = transforms.test_size(height, width, sample.get("is_jpeg", False), resize)
    if config_setting(self.config, "eval", "large_image") == "downscale":
      budget = int(config_setting(self.config, "eval", "max_batch_pixels"))
      target = fit_pixels(target, pad_multiple, budget)
    arrays = {}
    for key, kind in self.fields.items():
      if kind != IMAGE:
        continue
      image = sample[key]
      if image.shape[:2] != (height, width):
        raise UserInputError(
          f"{sample.get('id', '?')}: '{key}' is {image.shape[1]}x"
          f"{image.shape[0]}, '{self.target_field}' {width}x{height}; "
          f"task '{self.name}' needs aligned images of one size"
        )
      if tuple(target) != (height, width):
        image = transforms.resize_image(image, target)
      arrays[key], _ = transforms.pad_to_multiple(image, pad_multiple)
    return arrays, {"resized_hw": tuple(target), "original_hw": (height, width)}

  def prediction_logits(self, outputs: dict, inputs: dict) -> jax.Array:
    """(B, H, W) logit of 'tampered' at the padded input size (on device)."""
    raise NotImplementedError

  def predict_outputs(self, outputs, inputs):
    result = {"logit": self.prediction_logits(outputs, inputs)}
    image_logits = outputs.get("image_logits")
    result["image_score"] = (
      jax.nn.softmax(image_logits.astype(jnp.float32))[:, 1]
      if image_logits is not None
      else jnp.full((inputs[self.target_field].shape[0],), jnp.nan)
    )
    return result

  def tile_rows(self, arrays: dict, grid) -> list[dict]:
    """The rows of an input too large for one batch: each tile of `grid` (predict.tile_grid)
    of every field, as views (no copy)."""
    return [
      {key: value[y : y + grid.tile_h, x : x + grid.tile_w] for key, value in arrays.items()}
      for y, x in grid.windows()
    ]

  def tiled_prediction(self, grid) -> "TiledPrediction":
    """Collects the tiles' predict_outputs into one row for `finish`."""
    return TiledPrediction(grid)

  def finish(self, row, meta):
    """The map cropped to the resized image, resized back to the original size, then made a
    probability (logits are resized, never probabilities, as the official scripts do)."""
    height, width = meta["resized_hw"]
    logit = row["logit"][:height, :width]
    if (height, width) != tuple(meta["original_hw"]):
      logit = transforms.resize_image(logit, meta["original_hw"])
    else:
      logit = np.array(logit, np.float32)  # A copy: the row may be a batch's, or read-only.
    # sigmoid in place (one map at the image's size, not four temporaries): the same float32
    # operations, so the same bits, as 1 / (1 + exp(-logit)).
    prob = logit.astype(np.float32, copy=False)
    np.negative(prob, out=prob)
    np.exp(prob, out=prob)
    prob += np.float32(1.0)
    np.divide(np.float32(1.0), prob, out=prob)
    return {"prob": prob, "image_score": float(row["image_score"])}

  def write_prediction(self, out_dir, sample, prediction, threshold):
    from miml_jax import predict

    shown = {"id": sample["id"], "image": sample[self.target_field]}
    return predict.write_prediction(
      out_dir, shown, prediction["prob"], prediction["image_score"], threshold
    )

  def describe_prediction(self, record):
    score = f"  image score {record['image_score']:.3f}" if "image_score" in record else ""
    return (
      f"{record['image']}: {100 * record['tampered_fraction']:.1f}% tampered at "
      f"{record['threshold']:.3g}{score} -> {record['files']['overlay']}"
    )

  def evaluate(self, predictor, source, **kwargs):
    from miml_jax import evaluate

    return evaluate.evaluate(
      predictor, self.config, source, image_field=self.target_field, **kwargs
    )

  def format_result(self, result):
    from miml_jax import evaluate

    return evaluate.format_table(result)

  def summary_line(self, summary):
    return (
      f"IoU {summary['iou']:.4f}  P {summary['precision']:.4f}  R {summary['recall']:.4f}"
      f"  F1 {summary['f1']:.4f}  pixel AUC {summary['pixel_auc']:.4f}"
      f"  ({summary['num_images']} images"
    )


class TiledPrediction:
  """A dense prediction put together from its tiles (DenseTask.tiled_prediction): the logits
  blended with the grid's weights, which sum to 1 at every pixel (predict.tile_grid: an inner
  tile edge's outer quarter of the overlap is never used, its middle half is a linear ramp),
  into one float32 map at the padded size; the image score is the highest tile's (an image is
  tampered if any part of it is), nan without an image head."""

  def __init__(self, grid):
    self.grid = grid
    self.logit = np.zeros((grid.height, grid.width), np.float32)
    self.scores = []
    self._windows = grid.windows()

  def add(self, index: int, row: dict):
    y, x = self._windows[index]
    wy, wx = self.grid.weights(index)
    tile = np.asarray(row["logit"], np.float32)
    self.logit[y : y + tile.shape[0], x : x + tile.shape[1]] += tile * wy[:, None] * wx[None, :]
    self.scores.append(float(row["image_score"]))

  def result(self) -> dict:
    scores = [s for s in self.scores if not np.isnan(s)]
    return {"logit": self.logit, "image_score": max(scores) if scores else float("nan")}


def config_setting(config, section: str, name: str):
  """config.<section>.<name>, or the default of config.py's section dataclass when the config
  has no such key (configs that were never validated, e.g. built in a test)."""
  from miml_jax import config as config_lib

  values = config.get(section) or {}
  if name in values:
    return values[name]
  schema = config_lib.ExperimentConfig.SECTIONS[section].resolve()
  return {f.name: f.default for f in dataclasses.fields(schema)}[name]


def fit_pixels(size: tuple[int, int], multiple: int, max_pixels: int) -> tuple[int, int]:
  """`size` (height, width), or the largest size of its aspect ratio whose padding to a
  multiple of `multiple` has at most `max_pixels` pixels."""

  def padded(h, w):
    return -(-h // multiple) * multiple * (-(-w // multiple) * multiple)

  height, width = int(size[0]), int(size[1])
  if padded(height, width) <= max_pixels:
    return height, width
  scale = (max_pixels / (height * width)) ** 0.5
  while True:
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    if padded(h, w) <= max_pixels or (h, w) == (1, 1):
      return h, w
    scale *= 0.99
