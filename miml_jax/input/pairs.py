"""Data sources whose samples are image PAIRS, for the pair tasks (pair segmentation, which
segments what differs between an authentic image and its forgery, and the CAAA pair classifier).

A pair sample is
  {'authentic': uint8 (H, W, 3) RGB, 'forged': uint8 (H2, W2, 3) RGB,
   'mask': uint8 (H2, W2) grey 0..255, the edited pixels in the FORGED image's frame (all zero
           when the pair has none, e.g. real web pairs, which then have 'has_mask' False),
   'has_mask': bool, 'id': str, 'is_jpeg': bool (of the forged file),
   'forged_bytes': the forged file's bytes (real pairs only)}
and a classifier pair (pair_synth:) adds 'same_source' (int 0/1), 'aligned' (int 0/1) and 'box'
(float32 (4,): (x0, y0, x1, y1) of the crop, normalised to the source image, (0, 0, 1, 1) when
aligned).

Source strings (see sources.py):
  pairs:PATH         real pairs in the CAAA layout: PATH/<pair_id>/0.<ext> (authentic), 1.<ext>
                     (forged), optional mask.<ext> (PairFolderSource)
  tfds:.../ciml_pairs  the same pairs from a built datasets/ciml_pairs (BuiltPairSource):
                     identical samples
  coco_spg:PATH      synthetic in-place edits (SPG) of COCO objects, pixel-aligned (SPGSource)
  pair_synth:PATH    the pair classifier's self-supervised pairs from any folder of photos
                     (PairSynthSource)

Like the single-image forgery sources, the synthetic ones are deterministic per (seed, split,
index); their outputs are new composites, held losslessly (is_jpeg False).
"""

import dataclasses
import hashlib
import math
import os

import cv2
import numpy as np

from miml_jax import config as config_lib
from miml_jax import io
from miml_jax.errors import UserInputError

# Random streams of the synthetic pair sources, so that they differ from Object Jitter's (no
# stream), splicing's (1) and copy-move's (2) on the same host image.
_SPG_STREAM, _PAIR_SYNTH_STREAM = 3, 4
ROLES = (("0", "authentic"), ("1", "forged"))


def is_jpeg_bytes(data: bytes) -> bool:
  """Whether a file's bytes are a JPEG (its SOI marker): a built dataset keeps no file name, so
  both pair readers judge by content, and agree."""
  return bytes(data[:3]) == b"\xff\xd8\xff"


def _pair_sample(
  authentic_bytes: bytes,
  forged_bytes: bytes,
  mask_bytes: bytes | None,
  sample_id: str,
  names: tuple[str, str, str],
) -> dict:
  """A real pair's sample from its files' bytes; `names` are what errors call the three files."""
  authentic = io.decode_image(authentic_bytes, names[0])
  forged = io.decode_image(forged_bytes, names[1])
  if mask_bytes:
    mask = io.decode_mask(mask_bytes, names[2])
    io.check_same_size(forged, mask, names[1], names[2])
  else:
    mask = np.zeros(forged.shape[:2], np.uint8)
  return {
    "authentic": authentic,
    "forged": forged,
    "mask": mask,
    "has_mask": bool(mask_bytes),
    "id": sample_id,
    "is_jpeg": is_jpeg_bytes(forged_bytes),
    # The forged file itself: `miml-jax annotate` stores it unchanged (never re-encoded).
    "forged_bytes": forged_bytes,
  }


class PairFolderSource:
  """`pairs:PATH`: one folder per pair, PATH/<pair_id>/0.<ext> (authentic), 1.<ext> (forged) and
  optionally mask.<ext> (a grey mask of the forged image), as datasets/ciml_pairs reads them.

  Pairs are in sorted order of their ids (the folder names); other files in PATH are ignored. A
  pair folder without 0.* or 1.*, or with two files for one role (0.jpg and 0.png), is an error
  naming it, or, with `skip` (data.on_error='skip'), left out and listed in `skipped`.
  """

  def __init__(self, root: str, skip: bool = False):
    self.root = root
    self.skipped: list[str] = []
    if not os.path.isdir(root):
      raise UserInputError(f"{root}: no such directory (pairs: expects one folder per pair)")
    self.pairs: list[tuple[str, dict[str, str]]] = []
    for pair_id in sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))):
      folder = os.path.join(root, pair_id)
      try:
        self.pairs.append((pair_id, self._files(folder)))
      except UserInputError as e:
        if not skip:
          raise
        self.skipped.append(str(e))
    if not self.pairs:
      raise UserInputError(
        f"{root}: no pair folders with 0.<ext> (authentic) and 1.<ext> (forged) images"
      )

  @staticmethod
  def _files(folder: str) -> dict[str, str]:
    by_stem: dict[str, list[str]] = {}
    for path in io.list_images(folder):
      by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)
    for stem, what in ROLES + (("mask", "mask"),):
      if len(by_stem.get(stem, [])) > 1:
        raise UserInputError(
          f"{folder}: more than one {what} file ({', '.join(map(os.path.basename, by_stem[stem]))})"
        )
    for stem, what in ROLES:
      if stem not in by_stem:
        raise UserInputError(f"{folder}: no {stem}.<ext> ({what} image)")
    return {stem: paths[0] for stem, paths in by_stem.items() if stem in ("0", "1", "mask")}

  @classmethod
  def from_paths(cls, paths: list[str]) -> "PairFolderSource":
    """The pairs of several paths, each a pair folder itself or a folder of pair folders
    (what `miml-jax predict` takes for a pair task)."""
    found = []
    for path in paths:
      if not os.path.isdir(path):
        raise UserInputError(
          f"{path}: not a folder; a pair model predicts pair folders "
          f"(0.<ext> authentic, 1.<ext> forged) or folders of them"
        )
      stems = {os.path.splitext(os.path.basename(p))[0] for p in io.list_images(path)}
      if {"0", "1"} <= stems:
        found.append((os.path.basename(os.path.normpath(path)), cls._files(path)))
      else:
        found.extend(cls(path).pairs)
    source = cls.__new__(cls)
    source.root, source.skipped, source.pairs = os.path.commonpath(paths), [], found
    return source

  def stems(self) -> list[str]:
    """The pair ids (`miml-jax predict` names its outputs after them)."""
    return [pair_id for pair_id, _ in self.pairs]

  def __len__(self) -> int:
    return len(self.pairs)

  def __getitem__(self, index: int) -> dict:
    pair_id, files = self.pairs[index]
    mask_path = files.get("mask")
    return _pair_sample(
      io.read_bytes(files["0"]),
      io.read_bytes(files["1"]),
      io.read_bytes(mask_path) if mask_path else None,
      pair_id,
      (files["0"], files["1"], mask_path or ""),
    )


class BuiltPairSource:
  """A built datasets/ciml_pairs split (its raw records, from sources.TfdsSource), read into the
  samples PairFolderSource gives for the folder it was built from."""

  FIELDS = ("authentic", "forged", "mask", "has_mask", "id")

  def __init__(self, records, name: str):
    self.records, self.name = records, name
    if len(records) and any(field not in records[0] for field in self.FIELDS):
      raise UserInputError(
        f"{name}: not a ciml_pairs dataset (its examples lack "
        f"{', '.join(f for f in self.FIELDS if f not in records[0])})"
      )

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> dict:
    record = self.records[index]
    pair_id = record["id"].decode() if isinstance(record["id"], bytes) else str(record["id"])
    where = f"{self.name}[{pair_id}]"
    mask = record["mask"] if bool(record["has_mask"]) else None
    return _pair_sample(
      record["authentic"],
      record["forged"],
      mask,
      pair_id,
      (where + " authentic", where + " forged", where + " mask"),
    )


# ---- coco_spg: in-place edits of COCO objects -------------------------------------------------

SPG_KINDS = ("recolour", "remove", "replace")


def _check_range(prefix: str, name: str, value, low_bound: float = 0.0, strict: bool = False):
  low, high = value
  if not (low > low_bound if strict else low >= low_bound) or low > high:
    raise UserInputError(
      f"{prefix}.{name}: expected {low_bound} {'<' if strict else '<='} low <= high, got {value!r}"
    )


def _check_positive_int(prefix: str, name: str, value):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise UserInputError(f"{prefix}.{name}: expected a positive int, got {value!r}")


def _check_probability(prefix: str, name: str, value):
  if not 0.0 <= value <= 1.0:
    raise UserInputError(f"{prefix}.{name}: expected a value in [0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True)
class SPGConfig:
  """The coco_spg recipe (data.spg; see SPGSource)."""

  # Relative weights of SPG_KINDS (recolour, remove, replace); a 0 turns a kind off.
  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
  # Objects that qualify for editing (in the crop; for replace, also the donor's object): tight
  # box at least min_side px a side, at least min_area px, at most max_object_fraction of the
  # crop's area (a donor's: of its image's, at its own resolution).
  min_side: int = 8
  min_area: int = 256
  max_object_fraction: float = 0.5
  # Crops (and donors) tried per sample before falling back to an unedited pair.
  max_attempts: int = 10
  # An edit that changes fewer of its mask's pixels than this is rejected (a recolour of a black
  # or saturated object, an inpainting that restores the object's flat colour): the mask must
  # be evidence, not a label on unchanged pixels.
  min_changed_fraction: float = 0.5
  # recolour: |hue shift| in degrees and |brightness shift| in grey levels (either sign, drawn
  # uniformly), and saturation / contrast factors.
  hue_shift: tuple[float, float] = (20.0, 90.0)
  saturation_scale: tuple[float, float] = (0.6, 1.4)
  brightness_shift: tuple[float, float] = (15.0, 50.0)
  contrast_scale: tuple[float, float] = (0.7, 1.3)
  # remove: the object is dilated by this fraction of the crop side (at least 1 px) so that its
  # outline, which annotations miss by a pixel or two, goes too; then inpainted (Telea).
  remove_dilation: float = 0.01
  inpaint_radius: int = 3

  def __post_init__(self):
    prefix = "spg"
    if (
      len(self.weights) != len(SPG_KINDS)
      or any(w < 0 for w in self.weights)
      or not sum(self.weights) > 0
    ):
      raise UserInputError(
        f"spg.weights: expected {len(SPG_KINDS)} weights >= 0 (for "
        f"{', '.join(SPG_KINDS)}), not all 0, got {self.weights!r}"
      )
    for name in ("min_side", "min_area", "max_attempts", "inpaint_radius"):
      _check_positive_int(prefix, name, getattr(self, name))
    for name in ("max_object_fraction", "min_changed_fraction"):
      _check_probability(prefix, name, getattr(self, name))
    for name in ("hue_shift", "brightness_shift"):
      _check_range(prefix, name, getattr(self, name))
    for name in ("saturation_scale", "contrast_scale"):
      _check_range(prefix, name, getattr(self, name), strict=True)
    if not 0.0 <= self.remove_dilation < 0.5:
      raise UserInputError(
        f"spg.remove_dilation: expected a fraction in [0, 0.5), got {self.remove_dilation!r}"
      )

  @classmethod
  def from_config(cls, config) -> "SPGConfig":
    return config_lib.settings_from_config(cls, config, "spg")


def _qualifying(instances: np.ndarray, crop_area: int, cfg: SPGConfig) -> list[int]:
  """Indices of the objects that may be edited (or donated), in instance order."""
  out = []
  for index, instance in enumerate(instances):
    _, _, w, h = cv2.boundingRect(instance)
    if min(w, h) < cfg.min_side:
      continue
    if cfg.min_area <= cv2.countNonZero(instance) <= cfg.max_object_fraction * crop_area:
      out.append(index)
  return out


def recolour(
  image: np.ndarray, region: np.ndarray, rng: np.random.Generator, cfg: SPGConfig = SPGConfig()
) -> np.ndarray:
  """The object's pixels (bool (H, W) `region`) with their hue, saturation, brightness and
  contrast shifted; every other pixel is the input's. Draws hue, saturation, brightness,
  contrast, in that order."""
  hue = rng.uniform(*cfg.hue_shift) * rng.choice([-1.0, 1.0])
  saturation = rng.uniform(*cfg.saturation_scale)
  brightness = rng.uniform(*cfg.brightness_shift) * rng.choice([-1.0, 1.0])
  contrast = rng.uniform(*cfg.contrast_scale)
  pixels = image[region][None]  # (1, N, 3): only the object's pixels are converted.
  hsv = cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
  hsv[..., 0] = np.mod(hsv[..., 0] + hue * 256.0 / 360.0, 256.0)  # _FULL: hue in 0..255.
  hsv[..., 1] *= saturation
  hsv = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
  shifted = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL).astype(np.float32)
  mean = shifted.mean()
  shifted = (shifted - mean) * contrast + mean + brightness
  out = image.copy()
  out[region] = np.clip(np.rint(shifted[0]), 0, 255).astype(np.uint8)
  return out


def remove(image: np.ndarray, region: np.ndarray, cfg: SPGConfig = SPGConfig()):
  """The object inpainted away: (image, edited region as bool (H, W)), the region being the
  object dilated by cfg.remove_dilation; pixels outside it are the input's."""
  radius = max(1, round(cfg.remove_dilation * max(image.shape[:2])))
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
  dilated = cv2.dilate(region.astype(np.uint8), kernel)
  inpainted = cv2.inpaint(image, dilated, cfg.inpaint_radius, cv2.INPAINT_TELEA)
  edited = dilated != 0
  # Only the region is taken from the inpainting, so the ground truth is exact by construction.
  out = image.copy()
  out[edited] = inpainted[edited]
  return out, edited


def replace(image: np.ndarray, region: np.ndarray, patch: np.ndarray) -> np.ndarray:
  """In-place replacement: `patch` (a donor object's tight box) resized onto the region's tight
  box (aspect not kept, as the hosts' random resize) and written into the region's pixels."""
  x, y, w, h = cv2.boundingRect(region.astype(np.uint8))
  # Area averaging when shrinking, so a large donor does not alias.
  shrink = w * h < patch.shape[0] * patch.shape[1]
  fitted = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  out = image.copy()
  inside = region[y : y + h, x : x + w]
  out[y : y + h, x : x + w][inside] = fitted[inside]
  return out


class SPGSource:
  """`coco_spg:PATH`: synthetic SPG pairs, an object of a COCO photo edited in place.

  Item i, with an rng drawn from (seed, split, i) (a stream of its own), on host image i of
  `instances` (coco.CocoInstances or coco.BuiltCocoInstances: identical samples):
  1. the edit's kind, one of SPG_KINDS by cfg.weights (once per sample);
  2. the host resized as coco_splice does (each side to crop_size * U(resize_range)), padded;
  3. up to cfg.max_attempts times: a random crop_size x crop_size crop; one of its qualifying
     objects (see SPGConfig), uniformly; the edit:
     - recolour: hue / saturation / brightness / contrast shift of the object's pixels;
     - remove: cv2.inpaint over the object dilated by cfg.remove_dilation;
     - replace: a donor image (any but the host, uniformly) and one of its qualifying objects
       (at the donor's own resolution; uniformly among those whose box aspect is within a
       factor 2 of the object's, else among all), its tight box resized onto the object's box
       and written into the object's pixels (its silhouette stays, its content is foreign);
     accepted when at least cfg.min_changed_fraction of the edited region changed.
  'authentic' is the crop, 'forged' the edited crop and 'mask' 255 over the edited region (the
  object, or for 'remove' its dilation), so every changed pixel is in the mask. The sample also
  holds 'kind'. No crop with a qualifying object in any attempt (an image of tiny or huge
  objects only) or no accepted edit: the last crop comes back as both images, with an all-zero
  mask and kind 'authentic' (a valid "nothing changed" pair), counted in `fallback_count`.
  """

  def __init__(
    self,
    instances,
    crop_size: int,
    seed: int,
    split_id: int,
    config: SPGConfig = SPGConfig(),
    resize_range: tuple[float, float] = (1.0, 1.5),
  ):
    _check_positive_int("coco_spg", "crop_size", crop_size)
    low, high = (float(v) for v in resize_range)
    if not 0 < low <= high:
      raise UserInputError(f"resize_range: expected 0 < low <= high, got {resize_range!r}")
    if config.weights[SPG_KINDS.index("replace")] > 0 and len(instances) < 2:
      raise UserInputError(
        f"{instances!r}: coco_spg's 'replace' edit needs at least 2 images with "
        f"objects (a donor other than the host), got {len(instances)}; set "
        f"spg.weights' third value to 0 to leave it out"
      )
    self.instances, self.config = instances, config
    self.crop_size, self.resize_range = int(crop_size), (low, high)
    self.seed, self.split_id = int(seed), int(split_id)
    weights = np.asarray(config.weights, np.float64)
    self._probabilities = weights / weights.sum()
    self.fallback_count = 0  # Per process, as the other COCO sources'.

  def __len__(self) -> int:
    return len(self.instances)

  def _edit(self, kind, crop, region, index, rng):
    """One attempt's edit: (forged, edited region) or None."""
    from miml_jax.input import instance_forgery

    cfg = self.config
    if kind == "recolour":
      return recolour(crop, region, rng, cfg), region
    if kind == "remove":
      return remove(crop, region, cfg)
    donor_index = (index + 1 + int(rng.integers(len(self) - 1))) % len(self)
    donor = self.instances[donor_index]
    # The donor at its own resolution: its object is resampled once, straight onto the region's
    # box (a crop-scale donor would be enlarged from a few pixels, a visible mosaic).
    objects = donor["instances"]
    candidates = _qualifying(objects, objects.shape[1] * objects.shape[2], cfg)
    if not candidates:
      return None
    _, _, w, h = cv2.boundingRect(region.view(np.uint8))
    boxes = {k: cv2.boundingRect(objects[k])[2:] for k in candidates}
    # Preferably an object of a similar shape (box aspects within a factor 2), so that the
    # stretch onto the region's box stays moderate.
    similar = [
      k for k in candidates if abs(math.log(boxes[k][0] * h / (boxes[k][1] * w))) <= math.log(2)
    ]
    pool = similar or candidates
    chosen = pool[int(rng.integers(len(pool)))]
    patch, _ = instance_forgery.cut_object(donor["image"], objects[chosen])
    return replace(crop, region, patch), region

  def __getitem__(self, index: int) -> dict:
    from miml_jax.input import coco

    index = int(index)
    cfg, size = self.config, self.crop_size
    rng = np.random.default_rng([self.seed, self.split_id, _SPG_STREAM, index])
    kind = SPG_KINDS[int(rng.choice(len(SPG_KINDS), p=self._probabilities))]
    host = self.instances[index]
    image, objects = coco.random_resize(
      host["image"], host["instances"], rng, size, self.resize_range
    )
    image, objects = coco.pad_to_crop(image, objects, size)
    result = None
    for _ in range(cfg.max_attempts):
      y = int(rng.integers(0, image.shape[0] - size + 1))
      x = int(rng.integers(0, image.shape[1] - size + 1))
      crop = np.ascontiguousarray(image[y : y + size, x : x + size])
      crop_objects = np.ascontiguousarray(objects[:, y : y + size, x : x + size])
      candidates = _qualifying(crop_objects, size * size, cfg)
      if not candidates:
        continue
      region = crop_objects[candidates[int(rng.integers(len(candidates)))]] != 0
      edited = self._edit(kind, crop, region, index, rng)
      if edited is None:
        continue
      forged, edited_region = edited
      changed = np.count_nonzero(np.any(forged != crop, axis=-1) & edited_region)
      if changed >= cfg.min_changed_fraction * np.count_nonzero(edited_region):
        result = forged, edited_region
        break
    if result is None:
      self.fallback_count += 1
      forged, mask, kind = crop.copy(), np.zeros((size, size), np.uint8), "authentic"
    else:
      forged, mask = result[0], result[1].astype(np.uint8) * np.uint8(255)
    return {
      "authentic": crop,
      "forged": forged,
      "mask": mask,
      "has_mask": True,
      "id": host["name"],
      "is_jpeg": False,
      "kind": kind,
      "route": "spg",
    }


# ---- pair_synth: the pair classifier's self-supervised pairs ----------------------------------


@dataclasses.dataclass(frozen=True)
class PairSynthConfig:
  """The pair_synth recipe (data.pair_synth; see PairSynthSource)."""

  negative_prob: float = 0.5  # B from another photo (same_source 0), else a copy of A
  negative_blob_prob: float = 0.9  # a negative: one of the two gets blobs cut from the other
  positive_blob_prob: float = 0.9  # a positive: B gets blobs from a third photo
  crop_prob: float = 0.8  # a positive: B is cropped (aligned 0)
  crop_range: tuple[float, float] = (0.5, 0.95)  # the crop's side, a fraction of A's (both axes)
  swap_prob: float = 0.5  # the two images change places ('authentic' is B)
  blob_count: tuple[int, int] = (1, 3)  # blobs per receiving image, inclusive
  blob_size: tuple[float, float] = (1 / 16, 5 / 8)  # blob box side / receiver's side, per axis
  blob_points: tuple[int, int] = (4, 8)  # control points of a blob's closed Bezier outline
  blob_blur_prob: float = 0.8  # the blob's alpha edge Gaussian-blurred
  blob_blur_sigma: tuple[float, float] = (0.02, 0.08)  # sigma / the blob box's shorter side
  # The share of photos held out for validation (by a hash of their path relative to PATH, so
  # a photo is in one split whatever else the folder holds); 0: every split uses every photo.
  holdout: float = 0.1

  def __post_init__(self):
    prefix = "pair_synth"
    for name in (
      "negative_prob",
      "negative_blob_prob",
      "positive_blob_prob",
      "crop_prob",
      "swap_prob",
      "blob_blur_prob",
      "holdout",
    ):
      _check_probability(prefix, name, getattr(self, name))
    for name in ("blob_count", "blob_points"):
      low, high = getattr(self, name)
      _check_positive_int(prefix, name, low)
      _check_positive_int(prefix, name, high)
      if low > high or (name == "blob_points" and low < 3):
        raise UserInputError(
          f"{prefix}.{name}: expected {'3' if name == 'blob_points' else '1'}"
          f" <= low <= high, got {getattr(self, name)!r}"
        )
    _check_range(prefix, "blob_blur_sigma", self.blob_blur_sigma)
    for name in ("crop_range", "blob_size"):
      low, high = getattr(self, name)
      if not 0 < low <= high <= 1:
        raise UserInputError(
          f"{prefix}.{name}: expected 0 < low <= high <= 1, got {getattr(self, name)!r}"
        )

  @classmethod
  def from_config(cls, config) -> "PairSynthConfig":
    return config_lib.settings_from_config(cls, config, "pair_synth")


@dataclasses.dataclass(frozen=True)
class PairRecipe:
  """The draws that make one pair_synth sample (PairSynthSource.recipe), before any image is
  read; the blobs' shapes and places come from a stream of their own when it is rendered."""

  a: int  # photo index of A
  b: int  # photo index of B (== a for a positive)
  same_source: bool
  # Which image gets blobs ('a', 'b' or '' for none), and the photo they are cut from.
  receiver: str
  donor: int  # photo index, -1 without blobs
  blob_count: int
  # The crop of a positive's B as fractions: side (of A's width and height), and the offsets'
  # fractions of the free room (x, y); None: not cropped (aligned).
  crop: tuple[float, float, float] | None
  swapped: bool


def bezier_blob(
  height: int, width: int, rng: np.random.Generator, points: tuple[int, int] = (4, 8)
) -> np.ndarray:
  """A random closed smooth shape filling a (height, width) box: uint8 {0, 1}.

  n control points (n uniform in `points`) go round the centre at jittered, evenly spaced angles
  and random radii; the outline is the closed quadratic Bezier spline through the midpoints of
  consecutive control points (each control point the middle handle of one segment), so it is
  smooth and, the points being in angular order, does not cross itself. It is stretched to fill
  the box and filled at 1/8 px precision.
  """
  n = int(rng.integers(points[0], points[1] + 1))
  spacing = 2 * np.pi / n
  angles = (np.arange(n) + rng.uniform(-0.35, 0.35, n)) * spacing + rng.uniform(0, 2 * np.pi)
  radii = rng.uniform(0.35, 1.0, n)
  control = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
  nxt = np.roll(control, -1, axis=0)
  start, end = (control + nxt) / 2, (nxt + np.roll(control, -2, axis=0)) / 2
  t = np.linspace(0.0, 1.0, 12, endpoint=False)[None, :, None]
  outline = (
    (1 - t) ** 2 * start[:, None] + 2 * (1 - t) * t * nxt[:, None] + t**2 * end[:, None]
  ).reshape(-1, 2)
  low, high = outline.min(0), outline.max(0)
  scaled = (outline - low) / np.maximum(high - low, 1e-6) * [width, height]
  mask = np.zeros((height, width), np.uint8)
  # Corners of the box at (0, 0) and (width, height): pixel centres are at +0.5.
  cv2.fillPoly(mask, [np.round((scaled - 0.5) * 8).astype(np.int32)], 1, cv2.LINE_8, shift=3)
  return mask


def paste_blobs(
  receiver: np.ndarray,
  donor: np.ndarray,
  count: int,
  rng: np.random.Generator,
  cfg: PairSynthConfig = PairSynthConfig(),
):
  """`count` Bezier blobs of `donor`'s pixels alpha-blended into a copy of `receiver`.

  Each blob's box side is U(cfg.blob_size) of the receiver's (per axis, at least 2 px); with p
  cfg.blob_blur_prob its alpha edge is Gaussian-blurred (sigma U(cfg.blob_blur_sigma) times the
  box's shorter side). It lies wholly inside the receiver, at a uniform place, and shows the
  donor's pixels of a uniform place of the same size, at the donor's own scale (a donor smaller
  than the receiver is enlarged to cover it first, so any blob fits).

  Returns:
    (image, alpha, taken): alpha, float32 (H, W) in [0, 1], is how much of each receiver pixel
    is the donor's (0 exactly where nothing changed); taken, float32 in the donor's frame, how
    much of each donor pixel was copied (the same blobs where they were cut from).
  """
  height, width = receiver.shape[:2]
  source = donor
  if donor.shape[0] < height or donor.shape[1] < width:
    factor = max(height / donor.shape[0], width / donor.shape[1])
    source = cv2.resize(
      donor,
      (
        max(width, math.ceil(donor.shape[1] * factor)),
        max(height, math.ceil(donor.shape[0] * factor)),
      ),
      interpolation=cv2.INTER_LINEAR,
    )
  out = receiver.astype(np.float32)
  # What is left unblended (products of 1 - a), in the receiver's and in the source's frame.
  keep = np.ones((height, width), np.float32)
  untaken = np.ones(source.shape[:2], np.float32)
  for _ in range(count):
    bw = max(2, round(width * rng.uniform(*cfg.blob_size)))
    bh = max(2, round(height * rng.uniform(*cfg.blob_size)))
    shape = bezier_blob(bh, bw, rng, cfg.blob_points).astype(np.float32)
    if rng.random() < cfg.blob_blur_prob:
      sigma = max(0.5, rng.uniform(*cfg.blob_blur_sigma) * min(bw, bh))
      # Room for the blur's tail, where the receiver has it.
      pad = min(math.ceil(3 * sigma), (width - bw) // 2, (height - bh) // 2)
      shape = np.pad(shape, pad)
      shape = cv2.GaussianBlur(shape, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    h, w = shape.shape
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    sx = int(rng.integers(0, source.shape[1] - w + 1))
    sy = int(rng.integers(0, source.shape[0] - h + 1))
    region = out[y : y + h, x : x + w]
    region += shape[..., None] * (source[sy : sy + h, sx : sx + w].astype(np.float32) - region)
    keep[y : y + h, x : x + w] *= 1.0 - shape
    untaken[sy : sy + h, sx : sx + w] *= 1.0 - shape
  taken = 1.0 - untaken
  if source is not donor:
    taken = cv2.resize(taken, (donor.shape[1], donor.shape[0]), interpolation=cv2.INTER_AREA)
  return np.clip(np.rint(out), 0, 255).astype(np.uint8), 1.0 - keep, taken


def _held_out(name: str, share: float) -> bool:
  """Whether a photo belongs to the held-out share: a stable hash of its name (not Python's
  salted hash()), so the split is the same on every machine and run."""
  digest = hashlib.sha256(name.encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < share


def list_photos(root: str) -> list[str]:
  """Image files under `root`, recursively, sorted by their path relative to it."""
  if not os.path.isdir(root):
    raise UserInputError(f"{root}: no such directory (pair_synth: expects a folder of photos)")
  found = []
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    found += [os.path.join(folder, n) for n in names if n.lower().endswith(io.IMAGE_EXTENSIONS)]
  return sorted(found, key=lambda p: os.path.relpath(p, root))


class PairSynthSource:
  """`pair_synth:PATH`: the CAAA pair classifier's self-supervised pairs from any photos.

  Item i (photo A = photo i of PATH, recursively), deterministic per (seed, split, i):
  - negative (p cfg.negative_prob): B is another photo (uniform); with p cfg.negative_blob_prob
    one of the two (p 1/2 each) receives blob_count blobs cut from the other (shared donor
    content, so a shared patch alone does not prove a common source). same_source 0, aligned 0;
  - positive: B is a copy of A; with p cfg.positive_blob_prob B receives blobs from a third
    photo (any but A); then with p cfg.crop_prob B is cropped to a random crop whose sides are
    the same fraction U(cfg.crop_range) of A's (the aspect kept), at a uniform place: aligned 0,
    box = its corners normalised by A's width and height; else aligned 1.
  Blobs: see paste_blobs. Then the two change places with p cfg.swap_prob ('authentic' is B).
  'box' is always the crop in the uncropped image's frame, whichever role that image has after a
  swap (the model sees the crop and the larger picture and must place one in the other);
  (0, 0, 1, 1) when aligned and, carrying no place, for negatives. 'mask' is where the blobs
  are in the FORGED image's frame, whichever image received them, so that a swap loses nothing:
  the blobs it received; for a positive whose B received them and that is 'authentic' after the
  swap, the region of A they cover (A and B being one photo, aligned or related by the box; only
  what lies inside the crop); for a negative's donor, the regions they were cut from. Blob alpha
  x 255 (grey at blurred edges); all zero when the pair has no blobs. has_mask is True.
  Each image is resized to image_size x image_size on its own (bilinear, aspect not kept), so
  aligned images are pixel-aligned and box is in both images' normalised coordinates. 'id' is
  A's path relative to PATH.
  """

  def __init__(
    self,
    root: str,
    image_size: int,
    seed: int,
    split_id: int,
    config: PairSynthConfig = PairSynthConfig(),
    holdout_split: bool | None = None,
  ):
    """holdout_split: None uses every photo; False the photos outside the config's holdout
    share (training), True those inside it (validation)."""
    _check_positive_int("pair_synth", "image_size", image_size)
    self.root, self.config = root, config
    self.photos = list_photos(root)
    if holdout_split is not None and config.holdout > 0:
      self.photos = [
        p
        for p in self.photos
        if _held_out(os.path.relpath(p, root), config.holdout) == holdout_split
      ]
    if len(self.photos) < 2:
      raise UserInputError(
        f"{root}: pair_synth needs at least 2 photos (a negative's B, a "
        f"positive's donor), found {len(self.photos)}"
      )
    self.image_size, self.seed, self.split_id = int(image_size), int(seed), int(split_id)

  def __len__(self) -> int:
    return len(self.photos)

  def recipe(self, index: int) -> PairRecipe:
    """Item `index`'s draws (in this order: negative?, then B / blobs? / receiver / count for a
    negative, blobs? / donor / count / crop? / crop fractions for a positive, then swap?)."""
    cfg, n, a = self.config, len(self), int(index)
    rng = np.random.default_rng([self.seed, self.split_id, _PAIR_SYNTH_STREAM, a])
    other = lambda: (a + 1 + int(rng.integers(n - 1))) % n
    count = lambda: int(rng.integers(cfg.blob_count[0], cfg.blob_count[1] + 1))
    receiver, donor, blobs, crop = "", -1, 0, None
    if rng.random() < cfg.negative_prob:
      b = other()
      if rng.random() < cfg.negative_blob_prob:
        receiver = "a" if rng.random() < 0.5 else "b"
        donor, blobs = (b if receiver == "a" else a), count()
    else:
      b = a
      if rng.random() < cfg.positive_blob_prob:
        receiver, donor, blobs = "b", other(), count()
      if rng.random() < cfg.crop_prob:
        crop = (float(rng.uniform(*cfg.crop_range)), float(rng.random()), float(rng.random()))
    swapped = bool(rng.random() < cfg.swap_prob)
    return PairRecipe(
      a=a,
      b=b,
      same_source=a == b,
      receiver=receiver,
      donor=donor,
      blob_count=blobs,
      crop=crop,
      swapped=swapped,
    )

  @staticmethod
  def crop_box(crop: tuple[float, float, float], width: int, height: int) -> tuple[int, ...]:
    """A recipe's crop fractions -> (x0, y0, x1, y1) in pixels of an image width x height."""
    side, u, v = crop
    w, h = max(1, round(side * width)), max(1, round(side * height))
    x0, y0 = round(u * (width - w)), round(v * (height - h))
    return x0, y0, x0 + w, y0 + h

  def __getitem__(self, index: int) -> dict:
    recipe, cfg, size = self.recipe(index), self.config, self.image_size
    rng = np.random.default_rng([self.seed, self.split_id, _PAIR_SYNTH_STREAM, int(index), 1])
    image_a = io.read_image(self.photos[recipe.a])
    image_b = image_a if recipe.b == recipe.a else io.read_image(self.photos[recipe.b])
    # The blob edit's region (float alpha) in each image's frame; None without blobs.
    region_a = region_b = None
    if recipe.same_source and recipe.receiver:
      donor = io.read_image(self.photos[recipe.donor])
      image_b, region_b, _ = paste_blobs(image_b, donor, recipe.blob_count, rng, cfg)
      region_a = region_b  # B is A's copy: the same place in A's frame.
    elif recipe.receiver == "a":
      image_a, region_a, region_b = paste_blobs(image_a, image_b, recipe.blob_count, rng, cfg)
    elif recipe.receiver == "b":
      image_b, region_b, region_a = paste_blobs(image_b, image_a, recipe.blob_count, rng, cfg)
    box = np.array([0, 0, 1, 1], np.float32)
    if recipe.crop is not None:
      height, width = image_b.shape[:2]
      x0, y0, x1, y1 = self.crop_box(recipe.crop, width, height)
      image_b = image_b[y0:y1, x0:x1]
      if region_b is not None:
        region_b = region_b[y0:y1, x0:x1]
        region_a = np.zeros_like(region_a)
        region_a[y0:y1, x0:x1] = region_b  # What of the blobs B's crop still shows.
      box = np.array([x0 / width, y0 / height, x1 / width, y1 / height], np.float32)
    first, second = (image_a, region_a), (image_b, region_b)
    if recipe.swapped:
      first, second = second, first
    forged, alpha = _resize(second[0], size), second[1]
    mask = (
      np.zeros((size, size), np.uint8)
      if alpha is None
      else np.clip(np.rint(_resize(alpha, size) * 255), 0, 255).astype(np.uint8)
    )
    return {
      "authentic": _resize(first[0], size),
      "forged": forged,
      "mask": mask,
      "has_mask": True,
      "id": os.path.relpath(self.photos[recipe.a], self.root),
      "is_jpeg": False,
      "same_source": int(recipe.same_source),
      "aligned": int(recipe.same_source and recipe.crop is None),
      "box": box,
    }


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[:2] == (size, size):
    return np.ascontiguousarray(image)
  return cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
