"""Random-access data sources: what a config's `data.train` / `data.validation` strings name.

A source has `__len__` and `__getitem__(i) -> {'image': uint8 (H, W, 3) RGB, 'mask': uint8 (H, W)
grey 0..255, 'id': str, 'is_jpeg': bool}`, which is what grain's `MapDataset.source` needs.

Source strings:
  synthetic                 the embedded procedural forgery set (no download), any split
  synthetic:N               the same with N examples
  folder:/path/to/root      the MIML layout: root/imgs/<k>.<ext> with root/masks/<k>.png
  coco:/path/to/coco        COCO images with instance masks, made into forgeries by Object
                            Jitter (crops of data.image_size; split train -> COCO 'train',
                            validation -> 'val'); see coco.ObjectJitterSource
"""

import os

import numpy as np

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input import synthetic


class SyntheticSource:
  """The embedded forgery set, with its {0, 1} masks widened to the 0/255 convention."""

  def __init__(self, split: str, num_examples: int | None, image_size: int, seed: int):
    self._data = synthetic.SyntheticForgeries(
        split=split, num_examples=num_examples, image_size=image_size, seed=seed)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    sample = self._data[index]
    return {"image": sample["image"], "mask": sample["mask"] * np.uint8(255),
            "id": sample["id"], "is_jpeg": False}


class FolderSource:
  """MIML layout: `root/imgs/<k>.<ext>` and `root/masks/<k>.png` (any image extension)."""

  def __init__(self, root: str):
    self.root = root
    image_dir, mask_dir = os.path.join(root, "imgs"), os.path.join(root, "masks")
    if not os.path.isdir(image_dir):
      raise UserInputError(f"{root}: expected the MIML layout with an imgs/ and a masks/ folder")
    self.images = io.list_images(image_dir)
    if not self.images:
      raise UserInputError(f"{image_dir}: no images (extensions {', '.join(io.IMAGE_EXTENSIONS)})")
    masks_by_stem = {os.path.splitext(os.path.basename(p))[0]: p
                     for p in (io.list_images(mask_dir) if os.path.isdir(mask_dir) else [])}
    self.masks = []
    for path in self.images:
      stem = os.path.splitext(os.path.basename(path))[0]
      if stem not in masks_by_stem:
        raise UserInputError(f"{path}: no mask {os.path.join(mask_dir, stem)}.png")
      self.masks.append(masks_by_stem[stem])

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    image_path, mask_path = self.images[index], self.masks[index]
    image, mask = io.read_image(image_path), io.read_mask(mask_path)
    io.check_same_size(image, mask, image_path, mask_path)
    return {"image": image, "mask": mask, "id": os.path.relpath(image_path, self.root),
            "is_jpeg": image_path.lower().endswith((".jpg", ".jpeg"))}


def make_source(spec: str, split: str, *, image_size: int = 128, seed: int = 0):
  """Builds the source a config string names (see the module docstring)."""
  kind, _, arg = spec.partition(":")
  if kind == "synthetic":
    num = int(arg) if arg else None
    return SyntheticSource(split, num, image_size, seed)
  if kind == "folder":
    if not arg:
      raise UserInputError(f"data source '{spec}': give a path, folder:/path/to/root")
    return FolderSource(os.path.expanduser(arg))
  if kind == "coco":
    if not arg:
      raise UserInputError(f"data source '{spec}': give a path, coco:/path/to/coco")
    from miml_jax.input import coco  # grain and the COCO index only when asked for.
    instances = coco.CocoInstances(os.path.expanduser(arg),
                                   split_name={"validation": "val"}.get(split, split))
    return coco.ObjectJitterSource(instances, crop_size=image_size, seed=seed,
                                   split_id=synthetic.SPLIT_IDS.get(split, 0))
  raise UserInputError(
      f"data source '{spec}': unknown kind '{kind}' (known: synthetic, folder:PATH, coco:PATH)")
