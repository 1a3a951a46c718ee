"""CAAA auto-annotation: (authentic, forged) pairs in, a pixel-annotated training set out.

    miml-jax annotate --pairs pairs:web_pairs/ --out annotated/ \
        --classifier workdirs/classifier --spg workdirs/dass --sdg workdirs/sacm
    miml-jax data build mimlv2 --config annotations --manual-dir annotated/

Per pair (docs/caaa.md says why each step is as it is):
1. read and check it: unreadable files and images under `min_side` pixels or with a side ratio
   over `max_aspect` are recorded per pair (status 'error' or 'skipped') and never stop the
   run; greyscale and RGBA images are read as RGB; ids become file names (file_stem);
2. classify it (the pair classifier at `classifier_size`, or `--route` for all) and route it:
   'spg' (same source, aligned), 'spg_unaligned' (same source, cropped) or 'sdg';
3. 'spg_unaligned' pairs are aligned by the predicted crop box (the image that holds the other
   as a crop is cut to the box; which one it is, is decided by which alignment leaves the smaller
   difference) and go to the SPG annotator, or are dropped as the v1 code does
   (`unaligned='drop'`);
4. annotate: the SPG model (DASS's task, pair_segmentation) sees both images resized to
   `spg_size`, the SDG model (sdg_segmentation: SACM, Corr-DINO) both at `sdg_size`; the
   official test-time augmentation {identity, vertical flip, horizontal flip} (SPG: of both
   images, SDG: of the forged image only), logits un-flipped and combined as the official
   scripts do (SPG: mean, SDG: sum), then the probability;
5. QES of that soft mask, on device in the same jitted step (at the annotator's resolution, as
   the official SDG script scores it), and the cut-off: a pair is kept iff QES > qes_threshold
   (for the routes in `qes_routes`);
6. write: imgs/<name>.<ext> (the forged file's bytes, unchanged) and masks/<name>.png (the soft
   mask resized to the forged image's size, 0..255) for kept pairs, rejected/<name>.png (the
   soft mask) for rejected ones, and one JSON line per pair in
   annotations-<process>-of-<count>.jsonl: id, status, route, classifier scores, QES, and, for
   pairs with a known mask (synthetic evaluation pairs), the annotation's IoU and the trivial
   annotator's.

Batches run over every local device. Several processes (hosts) split the pairs: process k of
n takes pairs k, k + n, ... and writes its own JSON lines file, so no two processes write one
file. The run is restartable: a pair is recorded only after its files are in place (each file
written to a temporary name and renamed), so a killed run resumes without redoing a recorded
pair and never leaves a half-written file. At the end a report (report/report.md, a QES
histogram and a contact sheet of kept and rejected annotations) is written once every process
is done.
"""

import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import sys
import time
from typing import Any

import cv2
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from miml_jax import config as config_lib
from miml_jax import io, qes, sharding, tasks
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models import layers

ROUTES = ("spg", "spg_unaligned", "sdg")
MANIFEST = "annotate.json"
FORMAT = "miml-jax-annotate/1"
# What the pair's annotator is, per route (the builder's SPG / SDG category).
CATEGORY = {"spg": "spg", "spg_unaligned": "spg", "sdg": "sdg"}
# File signatures of the formats the builders read back (io.IMAGE_EXTENSIONS).
_SIGNATURES = (
  (b"\xff\xd8\xff", ".jpg"),
  (b"\x89PNG\r\n\x1a\n", ".png"),
  (b"BM", ".bmp"),
  (b"II*\x00", ".tif"),
  (b"MM\x00*", ".tif"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AnnotateConfig:
  """How `annotate` runs; every field is a flag of `miml-jax annotate` (docs/caaa.md)."""

  # Square sizes each model sees (the official runs: 512, 1024, 512).
  classifier_size: int = config_lib.setting(512, ge=32)
  spg_size: int = config_lib.setting(1024, ge=32)
  sdg_size: int = config_lib.setting(512, ge=32)
  # Keep iff QES > qes_threshold (official SDG: 0.5; MIMLv2's cut-off is not public). Routes
  # whose masks the cut-off applies to: v1 saved SPG masks unfiltered, hence a choice.
  qes_threshold: float = config_lib.probability(0.5)
  qes_routes: tuple[str, ...] = config_lib.setting(
    ("spg", "spg_unaligned", "sdg"),
    check=lambda v: None if set(v) <= set(ROUTES) else f"expected a subset of {ROUTES}",
  )
  # Test-time flips, and how their logits combine (official: SPG mean, SDG sum).
  tta: bool = True
  spg_tta: str = config_lib.setting("mean", choices=("mean", "sum"))
  sdg_tta: str = config_lib.setting("sum", choices=("mean", "sum"))
  # 'align': crop by the predicted box and annotate with the SPG model; 'drop': record only.
  unaligned: str = config_lib.setting("align", choices=("align", "drop"))
  min_side: int = config_lib.setting(32, ge=1)
  max_aspect: float = config_lib.setting(8.0, ge=1)
  # Pairs per device batch (rounded up to a multiple of the local devices).
  batch_size: int = config_lib.setting(8, ge=1)
  save_rejected: bool = True
  # The trivial SPG annotator of the evaluation: max over channels of |authentic - forged|
  # above this many grey levels.
  trivial_threshold: int = config_lib.setting(24, ge=0, le=255)
  # Evaluation on synthetic pairs: JPEG-recompress each image of a pair on its own, at a
  # quality drawn from [min, max] per image (deterministic per pair), as web pairs are;
  # pixel-exact composites flatter the trivial annotator. (0, 0): off.
  recompress: tuple[int, int] = config_lib.setting((0, 0), check=config_lib.ordered_pair(0, 100))

  @classmethod
  def from_dict(cls, values: dict) -> "AnnotateConfig":
    return config_lib.settings_from_config(cls, values, "annotate")


# ---- The models -------------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
  """A trained model of the pipeline: its config (with task), module and weights."""

  config: Any
  module: Any
  variables: Any
  name: str  # as the user gave it (recorded in the manifest)

  @property
  def task(self):
    return tasks.build(self.config)


def load_model(path: str, config_spec: str | None, what: str, expected_tasks: tuple[str, ...]):
  """A workdir / checkpoint (its own config), or an init file with --*-config."""
  from miml_jax import checkpoint

  if os.path.isdir(path):
    config, module, variables, _ = checkpoint.load_for_inference(path)
  else:
    if not config_spec:
      raise UserInputError(
        f"--{what} {path}: an init file needs --{what}-config (the experiment config it was "
        f"converted for)"
      )
    config, module, variables, _ = checkpoint.load_for_inference(
      None, init=path, config_spec=config_spec
    )
  name = tasks.task_name(config)
  if name not in expected_tasks:
    raise UserInputError(
      f"--{what} {path}: a {name} model; expected a {' or '.join(expected_tasks)} model"
    )
  return Model(config, module, variables, path)


class _Stage:
  """One jitted step over the local devices, weights replicated, batch rows split."""

  def __init__(self, fn, variables, mesh: Mesh):
    self.mesh = mesh
    rows = sharding.batch_sharding(mesh)
    self.variables = sharding.replicate(variables, mesh)
    self._rows = rows
    self._fn = jax.jit(
      fn, in_shardings=(sharding.replicated(mesh), rows), compiler_options=layers.compiler_options()
    )

  def __call__(self, batch: dict) -> dict:
    put = {k: jax.device_put(v, self._rows) for k, v in batch.items()}
    return jax.device_get(self._fn(self.variables, put))


def classify_fn(model: Model):
  task, module = model.task, model.module

  def step(variables, batch):
    outputs = module.apply(variables, **task.model_inputs(batch), train=False)
    return task.predict_outputs(outputs, batch)

  return step


def annotate_fn(model: Model, *, flip_authentic: bool, reduce: str, tta: bool):
  """The jitted annotation step: uint8 pairs (B, S, S, 3) -> soft masks (B, S, S) and QES (B,).

  Flipping commutes with the tasks' per-pixel input preparation, so the uint8 images are
  flipped and each task prepares its own input; the 'tampered' logits are un-flipped and
  combined before the probability (two-class softmax = sigmoid of the logit difference, so
  combining differences is combining the official scripts' class logits)."""
  task, module = model.task, model.module
  flips = (None, 1, 2) if tta else (None,)

  def step(variables, batch):
    total = 0.0
    for axis in flips:
      view = dict(batch)
      if axis is not None:
        for key in ("forged", "authentic") if flip_authentic else ("forged",):
          view[key] = jnp.flip(batch[key], axis)
      outputs = module.apply(variables, **task.model_inputs(view), train=False)
      logit = task.prediction_logits(outputs, view).astype(jnp.float32)
      total = total + (logit if axis is None else jnp.flip(logit, axis))
    if reduce == "mean":
      total = total / len(flips)
    soft = jax.nn.sigmoid(total)
    return {"soft": soft, "qes": qes.qes_batch(soft)}

  return step


# ---- Reading and checking pairs ---------------------------------------------------------------
@dataclasses.dataclass
class _Pair:
  index: int
  id: str
  authentic: np.ndarray  # at most `cap` on its long side
  forged: np.ndarray
  forged_size: tuple[int, int]  # (H, W) of the forged file
  forged_bytes: bytes
  extension: str
  truth: np.ndarray | None  # the known mask (bool, forged size), synthetic pairs
  true_route: str | None
  record: dict  # what the JSON line says so far


def _capped(image: np.ndarray, cap: int) -> np.ndarray:
  """The image with its long side at most `cap` (memory stays bounded whatever the file)."""
  height, width = image.shape[:2]
  scale = cap / max(height, width)
  if scale >= 1:
    return image
  size = (max(1, round(height * scale)), max(1, round(width * scale)))
  return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def _extension(data: bytes) -> str | None:
  for signature, extension in _SIGNATURES:
    if data.startswith(signature):
      return extension
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return ".webp"
  return None


def _true_route(sample: dict) -> str | None:
  """The route of a synthetic pair that knows it (coco_spg: 'spg', coco_sdg: 'sdg',
  pair_synth: from its labels)."""
  if "route" in sample:
    return str(sample["route"])
  if "donor_mask" in sample:
    return "sdg"
  if "same_source" in sample:
    from miml_jax.tasks.pair_classification import route

    return route(float(sample["same_source"]), float(sample["aligned"]))
  return None


def _read_pair(source, index: int, settings: AnnotateConfig, cap: int) -> "_Pair | dict":
  """The pair at `index`, or the JSON record of why it cannot be annotated."""
  try:
    sample = source[index]
  except UserInputError as e:
    return {"index": index, "status": "error", "reason": str(e)}
  except Exception as e:  # A corrupt file surfaces as many exception types; none stops the run.
    return {"index": index, "status": "error", "reason": f"{type(e).__name__}: {e}"}
  pair_id = str(sample["id"])
  record = {"index": index, "id": pair_id}
  for role in ("authentic", "forged"):
    height, width = sample[role].shape[:2]
    if min(height, width) < settings.min_side:
      return dict(
        record,
        status="skipped",
        reason=f"{role} image is {width}x{height}, under min_side={settings.min_side}",
      )
    if max(height, width) / min(height, width) > settings.max_aspect:
      return dict(
        record,
        status="skipped",
        reason=f"{role} image is {width}x{height}, a side ratio over "
        f"max_aspect={settings.max_aspect:g}",
      )
  if settings.recompress[1] > 0:
    rng = np.random.default_rng([index, 7])
    for role in ("authentic", "forged"):
      quality = int(rng.integers(settings.recompress[0], settings.recompress[1] + 1))
      sample[role] = transforms.jpeg_roundtrip(sample[role], quality)
    sample.pop("forged_bytes", None)  # The recompressed image is what is annotated and stored.
  data = sample.get("forged_bytes")
  extension = _extension(data) if data else None
  if extension is None:
    # A composite without a file (synthetic pairs) or a format the builder cannot read back:
    # stored losslessly.
    data, extension = io.encode_image(sample["forged"], ".png"), ".png"
  truth = sample["mask"] > 127 if sample.get("has_mask") else None
  return _Pair(
    index=index,
    id=pair_id,
    authentic=_capped(sample["authentic"], cap),
    forged=_capped(sample["forged"], cap),
    forged_size=tuple(sample["forged"].shape[:2]),
    forged_bytes=data,
    extension=extension,
    truth=truth,
    true_route=_true_route(sample),
    record=record,
  )


def file_stem(pair_id: str, index: int) -> str:
  """A file name for a pair id: itself when it is a plain name (a pair folder's), else with
  every run of other characters (a mixture's 'source:path/' prefix) replaced by '_', cut to
  100 characters; 'pair<index>' if nothing is left."""
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", pair_id).strip("._")[-100:].lstrip("._")
  return stem or f"pair{index}"


def _square(image: np.ndarray, size: int) -> np.ndarray:
  return transforms.resize_image(image, (size, size)) if image.shape[:2] != (size, size) else image


def _crop(image: np.ndarray, box) -> np.ndarray | None:
  """The part of `image` in the normalised (x0, y0, x1, y1) box, or None if it is degenerate."""
  height, width = image.shape[:2]
  x0, x1 = (int(round(float(v) * width)) for v in (box[0], box[2]))
  y0, y1 = (int(round(float(v) * height)) for v in (box[1], box[3]))
  x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
  if x1 - x0 < 8 or y1 - y0 < 8:
    return None
  return image[y0:y1, x0:x1]


def align_unaligned(pair: _Pair, box, size: int):
  """(authentic, forged) at size x size, aligned by the classifier's crop box, and where the
  forged image's annotation lies: None (all of it) or the box (the forged image is the larger
  one, so only the part inside the box has a counterpart). None if the box is degenerate.

  The box is in the coordinates of the image the other is a crop of; which one that is, the
  classifier does not say, so both alignments are tried and the one whose images differ less
  (mean absolute difference at 64 x 64) wins."""
  options = []
  cut = _crop(pair.authentic, box)
  if cut is not None:
    options.append(("authentic_cropped", _square(cut, size), _square(pair.forged, size), None))
  cut = _crop(pair.forged, box)
  if cut is not None:
    options.append(("forged_cropped", _square(pair.authentic, size), _square(cut, size), box))
  if not options:
    return None

  def difference(option):
    small = [cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA) for x in option[1:3]]
    return float(np.mean(np.abs(small[0].astype(np.float32) - small[1])))

  return min(options, key=difference)


# ---- Writing ------------------------------------------------------------------------------------
def _write_atomic(path: str, data: bytes):
  temporary = os.path.join(os.path.dirname(path), f".tmp-{os.getpid()}-{os.path.basename(path)}")
  with open(temporary, "wb") as f:
    f.write(data)
  os.replace(temporary, path)


def _mask_in_frame(soft: np.ndarray, size: tuple[int, int], box) -> np.ndarray:
  """The soft mask (float, annotator resolution) in the forged image's frame (H, W) float32:
  resized whole, or into `box` with zeros outside it."""
  height, width = size
  if box is None:
    return transforms.resize_image(soft, (height, width))
  frame = np.zeros((height, width), np.float32)
  x0, x1 = (int(round(float(v) * width)) for v in (box[0], box[2]))
  y0, y1 = (int(round(float(v) * height)) for v in (box[1], box[3]))
  x0, y0, x1, y1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
  frame[y0:y1, x0:x1] = transforms.resize_image(soft, (y1 - y0, x1 - x0))
  return frame


def _iou(prediction: np.ndarray, truth: np.ndarray) -> float:
  union = np.count_nonzero(prediction | truth)
  return float(np.count_nonzero(prediction & truth) / union) if union else 1.0


def trivial_annotation(authentic: np.ndarray, forged: np.ndarray, threshold: int) -> np.ndarray:
  """The trivial SPG annotator: pixels where the pair differs by more than `threshold` grey
  levels in some channel (authentic resized to the forged image first)."""
  if authentic.shape[:2] != forged.shape[:2]:
    authentic = transforms.resize_image(authentic, forged.shape[:2])
  difference = np.abs(authentic.astype(np.int16) - forged.astype(np.int16)).max(axis=-1)
  return difference > threshold


class _Ledger:
  """This process's JSON lines file: one record per pair, flushed and synced per batch."""

  def __init__(self, out_dir: str, process_index: int, process_count: int):
    self.path = os.path.join(
      out_dir, f"annotations-{process_index:05d}-of-{process_count:05d}.jsonl"
    )
    # A run killed while writing a line leaves it cut short: drop it, so that the next record
    # starts on a line of its own (read_records skips such a line, and the pair is redone).
    if os.path.isfile(self.path):
      with open(self.path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
          f.truncate(data.rfind(b"\n") + 1)
    self._file = open(self.path, "a")

  def write(self, records: list[dict]):
    for record in records:
      self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    self._file.close()


def read_records(out_dir: str) -> list[dict]:
  """Every pair record of every process's file (a line cut short by a kill is ignored)."""
  records = []
  for path in sorted(glob.glob(os.path.join(out_dir, "annotations-*.jsonl"))):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:
          continue
  return records


# ---- The run ----------------------------------------------------------------------------------
def _manifest(pairs: str, split: str, settings, models: dict) -> dict:
  return {
    "format": FORMAT,
    "pairs": pairs,
    "split": split,
    "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(settings).items()},
    "models": {role: (m.name if m else None) for role, m in models.items()},
  }


def _prepare_out(out_dir: str, manifest: dict):
  """Creates or resumes `out_dir`; refuses a folder that is not this run's output."""
  path = os.path.join(out_dir, MANIFEST)
  if os.path.isfile(path):
    with open(path) as f:
      found = json.load(f)
    different = sorted(k for k in manifest if found.get(k) != manifest[k])
    if different:
      raise UserInputError(
        f"{out_dir}: was annotated with other {', '.join(different)} ({path}); resume with "
        f"the same ones, or give another --out"
      )
    return True
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserInputError(
      f"{out_dir}: exists and is not an annotate output (no {MANIFEST}); give an empty or new "
      f"--out (nothing there is overwritten)"
    )
  for sub in ("imgs", "masks", "rejected"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  _write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode())
  return False


class _Progress:
  def __init__(self, total: int, stream, every: float = 5.0):
    self.total, self.stream, self.every = total, stream, every
    self.start = self.last = time.monotonic()
    self.done = self.shown = 0

  def step(self, count: int, counts: dict, force: bool = False):
    self.done += count
    now = time.monotonic()
    if (not force and now - self.last < self.every) or (force and self.shown == self.done):
      return
    self.last, self.shown = now, self.done
    rate = self.done / max(now - self.start, 1e-9)
    left = (self.total - self.done) / rate if rate > 0 else float("inf")
    eta = f"{left / 60:.1f} min" if np.isfinite(left) else "?"
    tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(
      f"annotate: {self.done}/{self.total} pairs, {rate:.2f} pairs/s, ETA {eta} ({tally})",
      file=self.stream,
      flush=True,
    )


def annotate(
  pairs: str,
  out_dir: str,
  *,
  classifier: Model | None,
  spg: Model | None,
  sdg: Model | None,
  route: str | None = None,
  settings: AnnotateConfig = AnnotateConfig(),
  split: str = "train",
  image_size: int = 512,
  limit: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
  report: bool = True,
  stream=None,
) -> dict:
  """Annotates this process's share of the pairs `pairs` names; see the module docstring.

  Returns this process's counts of pairs by status (this run's, not those resumed past)."""
  from miml_jax.input import sources

  stream = stream or sys.stderr
  if classifier is None and route is None:
    raise UserInputError("give --classifier, or --route to send every pair one way")
  if route is not None and route not in ROUTES:
    raise UserInputError(f"--route {route}: expected one of {', '.join(ROUTES)}")
  if spg is None and sdg is None:
    raise UserInputError("give --spg (an in-place edit annotator), --sdg, or both")
  models = {"classifier": classifier, "spg": spg, "sdg": sdg}
  manifest = _manifest(pairs, split, settings, models)
  manifest.update(route=route, image_size=image_size)
  # image_size: the crop size of synthetic pair sources (evaluation pairs); files keep theirs.
  source = sources.make_source(pairs, split, image_size=image_size)
  total = len(source) if limit is None else min(limit, len(source))
  resumed = _prepare_out(out_dir, manifest)
  recorded = read_records(out_dir)
  done = {r["index"] for r in recorded if "index" in r}
  names = {r["name"] for r in recorded if "name" in r}
  mine = [i for i in range(process_index, total, process_count) if i not in done]
  if resumed:
    print(
      f"annotate: resuming {out_dir}: {len(done)} pairs recorded, {len(mine)} left for "
      f"process {process_index}",
      file=stream,
    )

  devices = jax.local_devices()
  mesh = Mesh(np.array(devices).reshape(-1, 1), sharding.AXES)
  rows = -(-settings.batch_size // len(devices)) * len(devices)
  cap = 2 * max(settings.spg_size, settings.sdg_size, settings.classifier_size)
  classify = _Stage(classify_fn(classifier), classifier.variables, mesh) if classifier else None
  annotators = {}
  if spg is not None:
    step = annotate_fn(spg, flip_authentic=True, reduce=settings.spg_tta, tta=settings.tta)
    annotators["spg"] = (_Stage(step, spg.variables, mesh), settings.spg_size)
  if sdg is not None:
    step = annotate_fn(sdg, flip_authentic=False, reduce=settings.sdg_tta, tta=settings.tta)
    annotators["sdg"] = (_Stage(step, sdg.variables, mesh), settings.sdg_size)

  ledger = _Ledger(out_dir, process_index, process_count)
  progress = _Progress(len(mine), stream)
  counts: dict[str, int] = {}
  queues: dict[str, list] = {"spg": [], "sdg": []}

  def record(rec: dict):
    counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    return rec

  def pad(arrays: list[np.ndarray]) -> np.ndarray:
    batch = np.zeros((rows, *arrays[0].shape), arrays[0].dtype)
    batch[: len(arrays)] = np.stack(arrays)
    return batch

  def run_annotator(category: str, force: bool = False):
    queue = queues[category]
    while queue and (len(queue) >= rows or force):
      chunk, queue[:] = queue[:rows], queue[rows:]
      stage, _ = annotators[category]
      out = stage({"authentic": pad([c[1] for c in chunk]), "forged": pad([c[2] for c in chunk])})
      records = [
        record(
          _finish(pair, out["soft"][row], float(out["qes"][row]), box, settings, out_dir, names)
        )
        for row, (pair, _, _, box) in enumerate(chunk)
      ]
      ledger.write(records)
      progress.step(len(records), counts)

  def route_batch(batch: list[_Pair]):
    if classify is not None:
      images = {
        key: pad([_square(getattr(p, key), settings.classifier_size) for p in batch])
        for key in ("authentic", "forged")
      }
      scores = classify(images)
    immediate = []
    for row, pair in enumerate(batch):
      rec = pair.record
      if classify is not None:
        same, aligned = float(scores["same_source"][row]), float(scores["aligned"][row])
        box = [float(v) for v in np.clip(scores["box"][row], 0.0, 1.0)]
        from miml_jax.tasks.pair_classification import route as route_of

        pair_route = route_of(same, aligned)
        rec.update(same_source=same, aligned=aligned, box=box)
      else:
        pair_route, box = route, None
      rec["route"] = pair_route
      if pair.true_route is not None:
        rec["true_route"] = pair.true_route
      category = CATEGORY[pair_route]
      if pair_route == "spg_unaligned" and settings.unaligned == "drop":
        immediate.append(dict(rec, status="dropped", reason="not aligned (unaligned='drop')"))
        continue
      if category not in annotators:
        immediate.append(dict(rec, status="unannotated", reason=f"no --{category} model given"))
        continue
      size = annotators[category][1]
      if pair_route == "spg_unaligned":
        aligned_pair = align_unaligned(pair, box, size)
        if aligned_pair is None:
          immediate.append(dict(rec, status="skipped", reason=f"degenerate crop box {box}"))
          continue
        how, authentic, forged, where = aligned_pair
        rec["aligned_by"] = how
        queues[category].append((pair, authentic, forged, where))
      else:
        queues[category].append(
          (pair, _square(pair.authentic, size), _square(pair.forged, size), None)
        )
    for rec in immediate:
      record(rec)
    if immediate:
      ledger.write(immediate)
      progress.step(len(immediate), counts)
    for category in annotators:
      run_annotator(category)

  try:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      # Reading (decoding, resizing) runs in threads, a few batches ahead; memory stays bounded.
      for start in range(0, len(mine), rows * 4):
        chunk = mine[start : start + rows * 4]
        batch: list[_Pair] = []
        failed = []
        for item in pool.map(lambda i: _read_pair(source, i, settings, cap), chunk):
          if isinstance(item, dict):
            failed.append(record(item))
            continue
          batch.append(item)
          if len(batch) == rows:
            route_batch(batch)
            batch = []
        if failed:
          ledger.write(failed)
          progress.step(len(failed), counts)
        if batch:
          route_batch(batch)
      for category in annotators:
        run_annotator(category, force=True)
  finally:
    ledger.close()
  progress.step(0, counts, force=True)
  _write_atomic(os.path.join(out_dir, f".done-{process_index:05d}-of-{process_count:05d}"), b"")
  finished = all(
    os.path.isfile(os.path.join(out_dir, f".done-{k:05d}-of-{process_count:05d}"))
    for k in range(process_count)
  )
  if report and finished:
    write_report(out_dir, source, settings)
  return counts


def _finish(pair: _Pair, soft, score: float, box, settings, out_dir: str, names: set) -> dict:
  """Writes one annotated pair's files (kept or rejected) and returns its record."""
  rec = dict(pair.record, qes=score)
  route = rec["route"]
  keep = (score > settings.qes_threshold) if route in settings.qes_routes else np.isfinite(score)
  name = file_stem(pair.id, pair.index)
  if name in names:  # Two pairs whose ids map to one name (or repeat): the index tells apart.
    name = f"{name}~{pair.index}"
  names.add(name)
  frame = _mask_in_frame(np.asarray(soft, np.float32), pair.forged_size, box)
  mask = np.clip(np.rint(frame * 255.0), 0, 255).astype(np.uint8)
  if pair.truth is not None:
    rec["iou"] = _iou(mask >= 128, pair.truth)
    if CATEGORY[route] == "spg":
      forged = cv2.resize(pair.forged, pair.forged_size[::-1], interpolation=cv2.INTER_LINEAR)
      trivial = trivial_annotation(pair.authentic, forged, settings.trivial_threshold)
      rec["trivial_iou"] = _iou(trivial, pair.truth)
  png = io.encode_image(mask, ".png")
  if keep:
    _write_atomic(os.path.join(out_dir, "imgs", name + pair.extension), pair.forged_bytes)
    _write_atomic(os.path.join(out_dir, "masks", name + ".png"), png)
    rec.update(status="kept", name=name, source=CATEGORY[route])
  else:
    if settings.save_rejected:
      _write_atomic(os.path.join(out_dir, "rejected", name + ".png"), png)
    rec.update(status="rejected", name=name, source=CATEGORY[route])
  return rec


# ---- Report -----------------------------------------------------------------------------------
def summarize(records: list[dict], settings: AnnotateConfig) -> dict:
  """Counts per route and status; with known masks, the mean annotation IoU per route over all
  annotated pairs and over the kept ones, the kept share, the trivial annotator's IoU, and the
  routing accuracy."""
  by_status: dict[str, int] = {}
  by_route: dict[str, dict[str, int]] = {}
  for r in records:
    by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    if "route" in r:
      row = by_route.setdefault(r["route"], {})
      row[r["status"]] = row.get(r["status"], 0) + 1
  summary = {"pairs": len(records), "by_status": by_status, "by_route": by_route}
  annotated = [r for r in records if r["status"] in ("kept", "rejected")]
  scores = [r["qes"] for r in annotated if np.isfinite(r.get("qes", np.nan))]
  summary["qes_mean"] = float(np.mean(scores)) if scores else float("nan")
  truth = {}
  for route in ROUTES:
    rows = [r for r in annotated if r["route"] == route and "iou" in r]
    if not rows:
      continue
    kept = [r for r in rows if r["status"] == "kept"]
    entry = {
      "pairs": len(rows),
      "iou_all": float(np.mean([r["iou"] for r in rows])),
      "kept": len(kept),
      "kept_share": len(kept) / len(rows),
      "iou_kept": float(np.mean([r["iou"] for r in kept])) if kept else float("nan"),
    }
    trivial = [r["trivial_iou"] for r in rows if "trivial_iou" in r]
    if trivial:
      entry["trivial_iou_all"] = float(np.mean(trivial))
    truth[route] = entry
  if truth:
    summary["against_known_masks"] = truth
  routed = [r for r in records if "true_route" in r and "route" in r]
  if routed:
    summary["route_accuracy"] = float(np.mean([r["route"] == r["true_route"] for r in routed]))
    summary["routed_pairs"] = len(routed)
  summary["qes_threshold"] = settings.qes_threshold
  return summary


def write_report(out_dir: str, source, settings: AnnotateConfig, num_pictures: int = 6) -> dict:
  """report/report.md, summary.json, qes_histogram.png and contact_sheet.jpg."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  records = read_records(out_dir)
  summary = summarize(records, settings)
  folder = os.path.join(out_dir, "report")
  os.makedirs(folder, exist_ok=True)
  _write_atomic(os.path.join(folder, "summary.json"), json.dumps(summary, indent=1).encode())

  figure, axis = plt.subplots(figsize=(6, 3.2))
  bins = np.linspace(0, 1, 21)
  for status, colour in (("kept", "tab:green"), ("rejected", "tab:red")):
    values = [r["qes"] for r in records if r["status"] == status and np.isfinite(r["qes"])]
    axis.hist(values, bins=bins, color=colour, alpha=0.7, label=f"{status} ({len(values)})")
  axis.axvline(settings.qes_threshold, color="k", linestyle="--", linewidth=1)
  axis.set_xlabel("QES")
  axis.set_ylabel("pairs")
  axis.legend()
  figure.tight_layout()
  figure.savefig(os.path.join(folder, "qes_histogram.png"), dpi=110)
  plt.close(figure)

  sheet = contact_sheet(out_dir, source, records, num_pictures)
  if sheet is not None:
    cv2.imwrite(
      os.path.join(folder, "contact_sheet.jpg"),
      cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR),
      [cv2.IMWRITE_JPEG_QUALITY, 88],
    )
  lines = [
    "# Annotation report",
    "",
    f"{summary['pairs']} pairs: "
    + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_status"].items())),
    "",
    "| route | " + " | ".join(("kept", "rejected", "other")) + " |",
    "|---|---|---|---|",
  ]
  for route, row in sorted(summary["by_route"].items()):
    other = sum(v for k, v in row.items() if k not in ("kept", "rejected"))
    lines.append(f"| {route} | {row.get('kept', 0)} | {row.get('rejected', 0)} | {other} |")
  routes = ", ".join(settings.qes_routes) or "none: every annotation kept"
  lines += ["", f"QES cut-off {settings.qes_threshold:g} (routes {routes})"]
  if "against_known_masks" in summary:
    lines += [
      "",
      "Against the known masks (IoU of the mask at 0.5):",
      "",
      "| route | pairs | IoU, all | kept | kept share | IoU, kept | trivial IoU |",
      "|---|---|---|---|---|---|---|",
    ]
    for route, e in summary["against_known_masks"].items():
      trivial = e.get("trivial_iou_all")
      lines.append(
        f"| {route} | {e['pairs']} | {e['iou_all']:.3f} | {e['kept']} | {e['kept_share']:.2f} "
        f"| {e['iou_kept']:.3f} | {'-' if trivial is None else f'{trivial:.3f}'} |"
      )
  if "route_accuracy" in summary:
    lines += ["", f"Routing accuracy {summary['route_accuracy']:.3f} on {summary['routed_pairs']}"]
  lines += ["", "![QES](qes_histogram.png)", "", "![contact sheet](contact_sheet.jpg)", ""]
  _write_atomic(os.path.join(folder, "report.md"), "\n".join(lines).encode())
  return summary


def contact_sheet(out_dir: str, source, records: list[dict], count: int, height: int = 160):
  """Rows of authentic | forged | soft mask, the first `count` kept then `count` rejected
  pairs, each captioned with its status, route and QES (None if there is none)."""
  chosen = [r for r in records if r["status"] == "kept"][:count]
  chosen += [r for r in records if r["status"] == "rejected"][:count]
  rows = []
  for rec in chosen:
    sample = source[rec["index"]]
    folder = "masks" if rec["status"] == "kept" else "rejected"
    path = os.path.join(out_dir, folder, rec["name"] + ".png")
    if not os.path.isfile(path):
      continue
    mask = io.read_mask(path)
    tiles = []
    for image in (sample["authentic"], sample["forged"], np.repeat(mask[..., None], 3, -1)):
      scale = height / image.shape[0]
      tiles.append(cv2.resize(image, (max(1, round(image.shape[1] * scale)), height)))
    row = np.concatenate(tiles, axis=1)
    caption = f"{rec['status']} {rec['route']} QES {rec['qes']:.2f} {rec['id']}"
    cv2.putText(row, caption, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1)
    rows.append(row)
  if not rows:
    return None
  width = max(r.shape[1] for r in rows)
  return np.concatenate(
    [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0
  )
