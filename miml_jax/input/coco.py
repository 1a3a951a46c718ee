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

`BuiltCocoInstances` reads the same items from a dataset built by `miml-jax data build
coco_instances` (datasets/coco_instances): the image file's bytes, and each instance mask as
CocoInstances decodes it, re-encoded losslessly as a compressed RLE string. Both readers give
identical items in the same order, so every consumer (Object Jitter, instance_forgery's splicing
and copy-move) gives identical samples on either. `open_instances` picks the reader from a
`coco:` source's argument (a folder, or tfds:NAME[@SPLIT]).

`ObjectJitterTransform` turns an item into one training sample: random resize, random crop,
Object Jitter (see object_jitter.py) on the crop, retried on a fresh crop when it finds no
object or rejects the result.
"""

import json
import os
import re

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


def mask_to_runs(mask: np.ndarray) -> np.ndarray:
  """(H, W) mask (nonzero = object) -> int64 run lengths, column-major, starting with a 0 run
  (empty when the first pixel is set): the inverse of rle_to_mask."""
  flat = np.asarray(mask).T.ravel() != 0
  edges = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
  runs = np.diff(edges)
  return np.concatenate([[0], runs]) if flat.size and flat[0] else runs


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
      f"[{height}, {width}] (height, width)"
    )
  counts = segmentation["counts"]
  try:
    runs = decode_rle_string(counts) if isinstance(counts, str) else counts
    return rle_to_mask(runs, height, width)
  except ValueError as e:
    raise UserInputError(f"{where}: bad RLE: {e}") from e


def _load_annotation_file(path: str) -> tuple[list, list]:
  """The 'images' and 'annotations' lists of a COCO annotation file; errors name the file."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    images, annotations = data["images"], data["annotations"]
  except FileNotFoundError as e:
    raise UserInputError(f"{path}: no such file") from e
  except (ValueError, KeyError, TypeError) as e:
    raise UserInputError(
      f"{path}: not a COCO annotation file "
      f"(needs 'images' and 'annotations'): {type(e).__name__}: {e}"
    ) from e
  if not isinstance(images, list) or not isinstance(annotations, list):
    raise UserInputError(
      f"{path}: not a COCO annotation file ('images' and 'annotations' must be lists)"
    )
  return images, annotations


def _id_number(value) -> int:
  """An id as an int, -1 when it is missing or not an integer (only COCO's are numbers)."""
  return value if isinstance(value, int) and not isinstance(value, bool) else -1


class CocoInstances:
  """Random-access source of COCO images with their instance masks.

  Each item is {'image': uint8 (H, W, 3) RGB, 'instances': uint8 (N, H, W) in {0, 1}, N >= 1,
  'name': the image's file_name, 'category_ids', 'annotation_ids' (int64 (N,), -1 where the
  annotation has no integer one) and 'areas' (int64 (N,), each mask's pixel count)}. Images with no
  (kept) annotation are left out of the index; `num_skipped` says how many.
  """

  def __init__(
    self,
    root: str,
    split_name: str | None = "train",
    annotation_file: str | None = None,
    include_crowd: bool = False,
  ):
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
          os.path.join(self.root, "annotations", f"instances_{split_name}2017.json")
        )
      existing = [p for p in candidates if os.path.isfile(p)]
      if not existing:
        raise UserInputError(
          f"{self.root}: no COCO annotation file (looked for {' and '.join(candidates)})"
        )
      annotation_file = existing[0]
    self.annotation_file = os.fspath(annotation_file)
    images, annotations = _load_annotation_file(self.annotation_file)
    splits = None if split_name is None else {split_name, f"{split_name}2017"}
    by_id = {}
    for image in images:
      try:
        by_id[image["id"]] = (
          image["file_name"],
          int(image["height"]),
          int(image["width"]),
          splits is None or image.get("split", split_name) in splits,
        )
      except (KeyError, TypeError, ValueError) as e:
        raise UserInputError(
          f"{self.annotation_file}: image entry {image!r:.200} lacks id / file_name / height / "
          f"width"
        ) from e
    per_image = {}
    for annotation in annotations:
      if not isinstance(annotation, dict):
        raise UserInputError(
          f"{self.annotation_file}: annotation {annotation!r:.200} is not a JSON object"
        )
      where = f"{self.annotation_file}: annotation {annotation.get('id')!r}"
      if annotation.get("image_id") not in by_id:
        raise UserInputError(f"{where}: image_id {annotation.get('image_id')!r} is not an image")
      if annotation.get("iscrowd", 0) and not include_crowd:
        continue
      if not by_id[annotation["image_id"]][3]:
        continue
      per_image.setdefault(annotation["image_id"], []).append(
        {
          "id": annotation.get("id"),
          "category_id": _id_number(annotation.get("category_id")),
          "segmentation": _compact_segmentation(annotation.get("segmentation"), where),
        }
      )
    # In the annotation file's image order, so indices do not depend on dict ordering.
    self._records = [(by_id[i][:3], per_image[i]) for i in by_id if i in per_image]
    self._image_ids = [i for i in by_id if i in per_image]
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

  def image_info(self, index: int) -> dict:
    """Item `index`'s image without reading it: {'path', 'image_id' (-1 if not an integer),
    'height', 'width'}."""
    (file_name, height, width), _ = self._records[index]
    return {
      "path": os.path.join(self.image_dir, file_name),
      "image_id": _id_number(self._image_ids[index]),
      "height": height,
      "width": width,
    }

  def __getitem__(self, index: int) -> dict:
    return self.read_with_bytes(index)[0]

  def read_with_bytes(self, index: int) -> tuple[dict, bytes]:
    """Item `index` and its image file's bytes (what the coco_instances builder stores)."""
    (file_name, height, width), annotations = self._records[index]
    path = os.path.join(self.image_dir, file_name)
    # The image first: a broken file is reported before any mask work.
    data = io.read_bytes(path)
    image = io.decode_image(data, path)
    if image.shape[:2] != (height, width):
      raise UserInputError(
        f"{path}: image is {image.shape[1]}x{image.shape[0]} but {self.annotation_file} says "
        f"{width}x{height} (width x height)"
      )
    instances = np.stack(
      [
        _decode(a["segmentation"], height, width, f"{self.annotation_file}: annotation {a['id']!r}")
        for a in annotations
      ]
    )
    return _item(
      image,
      instances,
      file_name,
      [a["category_id"] for a in annotations],
      [_id_number(a["id"]) for a in annotations],
    ), data

  def __repr__(self) -> str:
    return (
      f"CocoInstances({self.annotation_file!r}, images={len(self)}, skipped={self.num_skipped})"
    )


def _item(
  image: np.ndarray, instances: np.ndarray, name: str, category_ids, annotation_ids
) -> dict:
  """The item both COCO readers return (see CocoInstances)."""
  return {
    "image": image,
    "instances": instances,
    "name": name,
    "category_ids": np.asarray(category_ids, np.int64).reshape(-1),
    "annotation_ids": np.asarray(annotation_ids, np.int64).reshape(-1),
    "areas": np.array([cv2.countNonZero(m) for m in instances], np.int64),
  }


def find_splits(root: str) -> dict[str, str]:
  """The splits of a COCO folder, as CocoInstances reads it: {COCO split name: annotation file}.

  root/annotations/instances.json: one entry per value of the images' 'split' field ('train2017'
  -> 'train') among images with a non-crowd annotation, or {'train': ...} when there is no such
  field. Otherwise one entry per root/annotations/instances_<split>2017.json (the official
  layout, images in root/<split>2017/).
  """
  root = os.fspath(root)
  merged = os.path.join(root, "annotations", "instances.json")
  if os.path.isfile(merged):
    images, annotations = _load_annotation_file(merged)
    annotated = {
      a.get("image_id") for a in annotations if isinstance(a, dict) and not a.get("iscrowd", 0)
    }
    names = set()
    for image in images:
      if isinstance(image, dict) and image.get("id") in annotated:
        name = str(image.get("split", "train"))
        names.add(name[:-4] if name.endswith("2017") else name)
    return dict.fromkeys(sorted(names), merged)
  folder = os.path.join(root, "annotations")
  found = sorted(
    name
    for name in (os.listdir(folder) if os.path.isdir(folder) else [])
    if re.fullmatch(r"instances_\w+2017\.json", name)
  )
  if not found:
    raise UserInputError(
      f"{root}: no COCO annotation file (looked for {merged} and "
      f"{os.path.join(folder, 'instances_<split>2017.json')})"
    )
  return {name[len("instances_") : -len("2017.json")]: os.path.join(folder, name) for name in found}


class BuiltCocoInstances:
  """The items of CocoInstances, from a dataset built by datasets/coco_instances.

  `records` is the built split's random-access data source (tfds `as_data_source`), whose
  examples hold the image file's bytes and each instance as a compressed RLE string; `name` is
  what errors call the dataset. Items equal CocoInstances' for the folder it was built from.
  """

  FIELDS = ("image", "id", "height", "width", "instances", "category_ids", "annotation_ids")

  def __init__(self, records, name: str):
    self._records, self.name = records, name
    self.num_skipped = 0  # The builder stored only images with instances.
    if len(records) and any(field not in records[0] for field in self.FIELDS):
      raise UserInputError(
        f"{name}: not a coco_instances dataset (its examples lack "
        f"{', '.join(f for f in self.FIELDS if f not in records[0])}); build "
        f"one with `miml-jax data build coco_instances --manual-dir DIR`"
      )

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict:
    record = self._records[index]
    file_name = _text(record["id"])
    where = f"{self.name}[{file_name}]"
    image = io.decode_image(record["image"], where + " image")
    height, width = int(record["height"]), int(record["width"])
    if image.shape[:2] != (height, width):
      raise UserInputError(
        f"{where}: image is {image.shape[1]}x{image.shape[0]}, stored size "
        f"{width}x{height} (width x height)"
      )
    masks = [
      _decode({"size": (height, width), "counts": _text(counts)}, height, width, where)
      for counts in record["instances"]
    ]
    instances = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
    return _item(image, instances, file_name, record["category_ids"], record["annotation_ids"])

  def __repr__(self) -> str:
    return f"BuiltCocoInstances({self.name!r}, images={len(self)})"


def _text(value) -> str:
  return value.decode("ascii") if isinstance(value, bytes) else str(value)


def open_instances(location: str, split: str, open_built=None):
  """A `coco:` source's host images: CocoInstances of a folder, or BuiltCocoInstances.

  Args:
    location: a COCO folder, or `tfds:...` naming a built coco_instances dataset.
    split: the data role's split, 'train' or 'validation'. A folder is read with COCO's name
      for it ('validation' -> 'val'); a built dataset has splits of the role's names.
    open_built: for `tfds:...`, a function (argument after 'tfds:', split) -> (records, name)
      that opens the built split (sources.py passes its TFDS reader's).
  """
  if location.startswith("tfds:"):
    records, name = open_built(location[len("tfds:") :], split)
    return BuiltCocoInstances(records, name)
  return CocoInstances(
    os.path.expanduser(location), split_name={"validation": "val"}.get(split, split)
  )


def random_resize(
  image: np.ndarray,
  instances: np.ndarray,
  rng: np.random.Generator,
  crop_size: int,
  resize_range: tuple[float, float],
):
  """Each side resized to crop_size * U(resize_range) (aspect not kept, as in the official data
  flow): the image bilinearly, the (N, H, W) instance masks by nearest neighbour, so they stay
  binary (Object Jitter and splicing make their own alpha from them). Draws height, then width."""
  height = int(round(crop_size * rng.uniform(*resize_range)))
  width = int(round(crop_size * rng.uniform(*resize_range)))
  if (height, width) != image.shape[:2]:
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    instances = (
      np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_NEAREST) for m in instances])
      if len(instances)
      else np.zeros((0, height, width), np.uint8)
    )
  return image, instances


def pad_to_crop(image: np.ndarray, instances: np.ndarray, crop_size: int):
  """Pads an image smaller than the crop (only a resize_range below 1 makes one) with black and
  no object on the bottom and right (the forgeries' masks are exact: no ignore label needed)."""
  pad_h, pad_w = max(0, crop_size - image.shape[0]), max(0, crop_size - image.shape[1])
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    instances = np.pad(instances, ((0, 0), (0, pad_h), (0, pad_w)))
  return image, instances


class ObjectJitterTransform(grain.transforms.RandomMap):
  """CocoInstances item -> {'image': uint8 (S, S, 3), 'mask': uint8 (S, S) in {0, 255}}.

  Each side is resized to crop_size * U(resize_range) (aspect not kept, as in the official data
  flow), then up to `config.max_attempts` random crops are tried until Object Jitter accepts one.
  If none is accepted (an image whose objects are all tiny or huge), the last crop is returned
  unmodified with an all-zero mask: an authentic sample is valid training data, and it keeps the
  pipeline's one-in, one-out shape. `fallback_count` counts those, per process (each grain worker
  has its own copy of the transform). With `keep_host` the output also holds 'host_image', the
  crop before jitter (for `miml-jax data show`); training leaves it off and carries nothing extra.
  """

  def __init__(
    self,
    crop_size: int = 512,
    resize_range: tuple[float, float] = (1.0, 1.5),
    config: ObjectJitterConfig = ObjectJitterConfig(),
    keep_host: bool = False,
  ):
    if not isinstance(crop_size, (int, np.integer)) or isinstance(crop_size, bool) or crop_size < 1:
      raise UserInputError(f"crop_size: expected a positive int, got {crop_size!r}")
    lo, hi = (float(v) for v in resize_range)
    if not 0 < lo <= hi:
      raise UserInputError(f"resize_range: expected 0 < low <= high, got {resize_range!r}")
    self.crop_size = int(crop_size)
    self.resize_range = (lo, hi)
    self.config = config
    self.fallback_count = 0
    self.keep_host = bool(keep_host)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    size = self.crop_size
    image, instances = random_resize(
      element["image"], element["instances"], rng, size, self.resize_range
    )
    image, instances = pad_to_crop(image, instances, size)
    for _ in range(self.config.max_attempts):
      y = int(rng.integers(0, image.shape[0] - size + 1))
      x = int(rng.integers(0, image.shape[1] - size + 1))
      crop = np.ascontiguousarray(image[y : y + size, x : x + size])
      result = object_jitter(crop, instances[:, y : y + size, x : x + size], rng, self.config)
      if result is not None:
        break
    else:
      self.fallback_count += 1
      result = crop, np.zeros((size, size), np.uint8)
    out = {"image": result[0], "mask": result[1]}
    if self.keep_host:
      out["host_image"] = crop
    return out


class ObjectJitterSource:
  """The `coco:PATH` data source: COCO images made into forgeries by Object Jitter.

  Item i is image i of `coco` after `ObjectJitterTransform` with an rng drawn from
  (seed, split, i): deterministic per (seed, index) as docs/methods.md says, and the same in every
  process. Like the synthetic set, an index always gives the same forgery; the trainer's own
  augmentation (flips, rot90, JPEG, RGB shift) still varies from epoch to epoch.
  Items follow the source contract of `miml_jax.input.sources`.
  """

  def __init__(
    self,
    coco: CocoInstances,
    crop_size: int,
    seed: int,
    split_id: int,
    config: ObjectJitterConfig = ObjectJitterConfig(),
  ):
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
    sample = {"image": out["image"], "mask": out["mask"], "id": element["name"], "is_jpeg": False}
    if "host_image" in out:  # self.transform.keep_host: the crop before jitter, for data show.
      sample["host_image"] = out["host_image"]
    return sample
