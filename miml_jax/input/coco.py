"""COCO instance masks as a random-access source, and Object Jitter as a grain transform.

`CocoInstances` reads a COCO-format folder: an annotation file (root/annotations/instances.json,
as in ../shared/data/coco_mini, or the official root/annotations/instances_<split>2017.json)
and the images it names (under root/images/, root/<split>2017/ or root/). Only the annotation
index is built up front, kept compact (polygons as float32 arrays); masks are decoded when an
item is read, so a grain worker holds one image's masks at a time.

Masks are decoded without pycocotools:
- polygons with cv2.fillPoly, in COCO's continuous coordinates (a pixel's centre is at +0.5) at
  1/8 px precision. OpenCV also fills the pixels its outline touches, so a mask is about half a
  pixel fuller all round than the polygon (on coco_mini the median mask is 6% larger than the
  polygon's area); annotators' outlines are rarely better than that, and Object Jitter pastes a
  soft, enlarged alpha anyway;
- RLE, uncompressed (`counts` a list of run lengths) or compressed (`counts` a str in COCO's
  6-bit, delta-coded variable-length format); both run down columns, starting with a 0 run.

`ObjectJitterTransform` turns an item into one training sample: random resize, random crop,
Object Jitter (see object_jitter.py) on the crop, retried on a fresh crop when it finds no
object or rejects the result.
"""

import json
import os

import cv2
import grain
import numpy as np

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input.object_jitter import ObjectJitterConfig, object_jitter


def decode_rle_string(counts: str) -> list[int]:
  """COCO's compressed RLE string -> run lengths.

  Each run is a signed varint in 5-bit groups, least significant first, one char per group
  (value + 48; bit 0x20 = more groups follow, bit 0x10 of the last group = negative). From the
  third run on, the value is the difference to the run two before (the run of the same colour).
  """
  runs = []
  data = counts.encode("ascii")
  position = 0
  while position < len(data):
    value, shift, more = 0, 0, True
    while more:
      if position >= len(data):
        raise ValueError("truncated RLE string")
      group = data[position] - 48
      value |= (group & 0x1F) << shift
      more = bool(group & 0x20)
      position += 1
      shift += 5
      if not more and group & 0x10:
        value |= -1 << shift  # Sign-extend.
    if len(runs) > 2:
      value += runs[-2]
    runs.append(value)
  return runs


def encode_rle_string(runs) -> str:
  """Run lengths -> COCO's compressed RLE string (the inverse of decode_rle_string)."""
  chars = []
  for i, run in enumerate(runs):
    value = int(run) - (int(runs[i - 2]) if i > 2 else 0)
    more = True
    while more:
      group = value & 0x1F
      value >>= 5
      more = value != -1 if group & 0x10 else value != 0
      chars.append(chr(group + (0x20 if more else 0) + 48))
  return "".join(chars)


def rle_to_mask(runs, height: int, width: int) -> np.ndarray:
  """Run lengths (column-major, 0 run first) -> uint8 (H, W) mask in {0, 1}."""
  runs = np.asarray(runs, np.int64)
  if np.any(runs < 0) or runs.sum() != height * width:
    raise ValueError(f"RLE runs cover {runs.sum()} pixels, expected {height}x{width}")
  values = (np.arange(len(runs)) % 2).astype(np.uint8)
  return np.repeat(values, runs).reshape(width, height).T.copy()


def polygons_to_mask(polygons, height: int, width: int) -> np.ndarray:
  """COCO polygons ((K, 2) x, y arrays, or flat lists) -> uint8 (H, W) mask in {0, 1}, the union."""
  mask = np.zeros((height, width), np.uint8)
  for polygon in polygons:
    points = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(points) < 3:
      continue
    # Shift to OpenCV's convention (pixel centres on integers), in 1/8 px fixed point. One call
    # per polygon: several in one call would cancel where they overlap (even-odd filling).
    fixed = np.round((points - 0.5) * 8).astype(np.int32)
    cv2.fillPoly(mask, [fixed], 1, lineType=cv2.LINE_8, shift=3)
  return mask


def _compact_segmentation(segmentation, where: str):
  """The index's form of a segmentation: polygons as float32 (K, 2) arrays, RLE as a dict."""
  if isinstance(segmentation, list):
    try:
      return [np.asarray(p, np.float32).reshape(-1, 2) for p in segmentation]
    except (TypeError, ValueError) as e:
      raise UserInputError(f"{where}: polygons must be flat lists of x, y numbers ({e})") from e
  if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
    counts = segmentation["counts"]
    if isinstance(counts, list):
      counts = np.asarray(counts, np.int64)
    elif not isinstance(counts, str):
      raise UserInputError(f"{where}: RLE counts must be a list or a str, got {type(counts)}")
    size = tuple(int(v) for v in segmentation["size"])
    return {"size": size, "counts": counts}
  raise UserInputError(f"{where}: segmentation must be polygons or an RLE dict with counts, size")


def _decode(segmentation, height: int, width: int, where: str) -> np.ndarray:
  if isinstance(segmentation, list):
    return polygons_to_mask(segmentation, height, width)
  if segmentation["size"] != (height, width):
    raise UserInputError(
        f"{where}: RLE size {list(segmentation['size'])} differs from the image's "
        f"[{height}, {width}] (height, width)")
  counts = segmentation["counts"]
  try:
    runs = decode_rle_string(counts) if isinstance(counts, str) else counts
    return rle_to_mask(runs, height, width)
  except ValueError as e:
    raise UserInputError(f"{where}: bad RLE: {e}") from e


class CocoInstances:
  """Random-access source of COCO images with their instance masks.

  Each item is {'image': uint8 (H, W, 3) RGB, 'instances': uint8 (N, H, W) in {0, 1}, N >= 1,
  'name': the image's file_name}. Images with no (kept) annotation are left out of the index;
  `num_skipped` says how many.
  """

  def __init__(self, root: str, split_name: str | None = "train",
               annotation_file: str | None = None, include_crowd: bool = False):
    """Indexes the annotations.

    Args:
      root: the COCO folder.
      split_name: 'train', 'val', ...: picks instances_<split_name>2017.json when there is no
        instances.json, the <split_name>2017/ image folder, and, in a merged annotation file whose
        images carry a 'split' field (coco_mini), the images of that split. None: every image.
      annotation_file: the annotation json, overriding the search above.
      include_crowd: keep iscrowd annotations. Off by default: a crowd region is many objects
        under one mask, not an object to jitter.
    """
    self.root = os.fspath(root)
    if annotation_file is None:
      candidates = [os.path.join(self.root, "annotations", "instances.json")]
      if split_name is not None:
        candidates.append(
            os.path.join(self.root, "annotations", f"instances_{split_name}2017.json"))
      existing = [p for p in candidates if os.path.isfile(p)]
      if not existing:
        raise UserInputError(f"{self.root}: no COCO annotation file (looked for "
                             f"{' and '.join(candidates)})")
      annotation_file = existing[0]
    self.annotation_file = os.fspath(annotation_file)
    try:
      with open(self.annotation_file, encoding="utf-8") as f:
        data = json.load(f)
      images, annotations = data["images"], data["annotations"]
    except FileNotFoundError as e:
      raise UserInputError(f"{self.annotation_file}: no such file") from e
    except (ValueError, KeyError, TypeError) as e:
      raise UserInputError(f"{self.annotation_file}: not a COCO annotation file "
                           f"(needs 'images' and 'annotations'): {type(e).__name__}: {e}") from e
    splits = None if split_name is None else {split_name, f"{split_name}2017"}
    by_id = {}
    for image in images:
      try:
        by_id[image["id"]] = (image["file_name"], int(image["height"]), int(image["width"]),
                              splits is None or image.get("split", split_name) in splits)
      except (KeyError, TypeError, ValueError) as e:
        raise UserInputError(
            f"{self.annotation_file}: image entry {image!r:.200} lacks id / file_name / height / "
            f"width") from e
    per_image = {}
    for annotation in annotations:
      where = f"{self.annotation_file}: annotation {annotation.get('id')!r}"
      if annotation.get("image_id") not in by_id:
        raise UserInputError(f"{where}: image_id {annotation.get('image_id')!r} is not an image")
      if annotation.get("iscrowd", 0) and not include_crowd:
        continue
      if not by_id[annotation["image_id"]][3]:
        continue
      per_image.setdefault(annotation["image_id"], []).append(
          {"id": annotation.get("id"),
           "segmentation": _compact_segmentation(annotation.get("segmentation"), where)})
    # In the annotation file's image order, so indices do not depend on dict ordering.
    self._records = [(by_id[i][:3], per_image[i]) for i in by_id if i in per_image]
    self.num_skipped = sum(1 for i, entry in by_id.items() if entry[3] and i not in per_image)
    if not self._records:
      raise UserInputError(f"{self.annotation_file}: no annotated image in split {split_name!r}")
    first = self._records[0][0][0]
    folders = [os.path.join(self.root, "images")]
    if split_name is not None:
      folders.append(os.path.join(self.root, f"{split_name}2017"))
    folders.append(self.root)
    found = [d for d in folders if os.path.isfile(os.path.join(d, first))]
    if not found:
      raise UserInputError(f"{first}: image not found in any of {', '.join(folders)}")
    self.image_dir = found[0]

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    (file_name, height, width), annotations = self._records[index]
    path = os.path.join(self.image_dir, file_name)
    # The image first: a broken file is reported before any mask work.
    image = io.read_image(path)
    if image.shape[:2] != (height, width):
      raise UserInputError(
          f"{path}: image is {image.shape[1]}x{image.shape[0]} but {self.annotation_file} says "
          f"{width}x{height} (width x height)")
    instances = np.stack([
        _decode(a["segmentation"], height, width,
                f"{self.annotation_file}: annotation {a['id']!r}") for a in annotations])
    return {"image": image, "instances": instances, "name": file_name}

  def __repr__(self) -> str:
    return (f"CocoInstances({self.annotation_file!r}, images={len(self)}, "
            f"skipped={self.num_skipped})")


class ObjectJitterTransform(grain.transforms.RandomMap):
  """CocoInstances item -> {'image': uint8 (S, S, 3), 'mask': uint8 (S, S) in {0, 255}}.

  Each side is resized to crop_size * U(resize_range) (aspect not kept, as in the official data
  flow), then up to `config.max_attempts` random crops are tried until Object Jitter accepts one.
  If none is accepted (an image whose objects are all tiny or huge), the last crop is returned
  unmodified with an all-zero mask: an authentic sample is valid training data, and it keeps the
  pipeline's one-in, one-out shape. `fallback_count` counts those, per process (each grain worker
  has its own copy of the transform).
  """

  def __init__(self, crop_size: int = 512, resize_range: tuple[float, float] = (1.0, 1.5),
               config: ObjectJitterConfig = ObjectJitterConfig()):
    if (not isinstance(crop_size, (int, np.integer)) or isinstance(crop_size, bool) or
        crop_size < 1):
      raise UserInputError(f"crop_size: expected a positive int, got {crop_size!r}")
    lo, hi = (float(v) for v in resize_range)
    if not 0 < lo <= hi:
      raise UserInputError(f"resize_range: expected 0 < low <= high, got {resize_range!r}")
    self.crop_size = int(crop_size)
    self.resize_range = (lo, hi)
    self.config = config
    self.fallback_count = 0

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    image, instances = element["image"], element["instances"]
    size = self.crop_size
    height = int(round(size * rng.uniform(*self.resize_range)))
    width = int(round(size * rng.uniform(*self.resize_range)))
    if (height, width) != image.shape[:2]:
      image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
      # Nearest keeps the masks binary; Object Jitter makes its own soft alpha from them.
      instances = np.stack(
          [cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in instances]
      ) if len(instances) else np.zeros((0, height, width), np.uint8)
    # Only a resize_range below 1 makes an image smaller than the crop; pad it with black and
    # no object (Object Jitter's mask is exact, so no ignore label is needed).
    pad_h, pad_w = max(0, size - height), max(0, size - width)
    if pad_h or pad_w:
      image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
      instances = np.pad(instances, ((0, 0), (0, pad_h), (0, pad_w)))
    for _ in range(self.config.max_attempts):
      y = int(rng.integers(0, image.shape[0] - size + 1))
      x = int(rng.integers(0, image.shape[1] - size + 1))
      crop = np.ascontiguousarray(image[y:y + size, x:x + size])
      result = object_jitter(crop, instances[:, y:y + size, x:x + size], rng, self.config)
      if result is not None:
        return {"image": result[0], "mask": result[1]}
    self.fallback_count += 1
    return {"image": crop, "mask": np.zeros((size, size), np.uint8)}


class ObjectJitterSource:
  """The `coco:PATH` data source: COCO images made into forgeries by Object Jitter.

  Item i is image i of `coco` after `ObjectJitterTransform` with an rng drawn from
  (seed, split, i): deterministic per (seed, index) as METHODS.md asks, and the same in every
  process. Like the synthetic set, an index always gives the same forgery; the trainer's own
  augmentation (flips, rot90, JPEG, RGB shift) still varies from epoch to epoch.
  Items follow the source contract of `miml_jax.input.sources`.
  """

  def __init__(self, coco: CocoInstances, crop_size: int, seed: int, split_id: int,
               config: ObjectJitterConfig = ObjectJitterConfig()):
    self.coco = coco
    self.transform = ObjectJitterTransform(crop_size, config=config)
    self.seed, self.split_id = int(seed), int(split_id)

  def __len__(self) -> int:
    return len(self.coco)

  def __getitem__(self, index: int) -> dict:
    element = self.coco[index]
    rng = np.random.default_rng([self.seed, self.split_id, int(index)])
    out = self.transform.random_map(element, rng)
    # A new composite, held losslessly: not a JPEG file any more.
    return {"image": out["image"], "mask": out["mask"], "id": element["name"], "is_jpeg": False}
