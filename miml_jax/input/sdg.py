"""`coco_sdg:PATH`: synthetic SDG pairs ("shared donor group") from COCO instance masks, for the
SDG task (tasks/sdg_segmentation.py, SACM): an object of photo A, cut out by its instance mask,
pasted into another photo B. A is the pair's authentic image, the composite the forged one.

Item i, with an rng drawn from (seed, split, stream, i) (a stream of its own, so it differs
from the coco_splice / Object Jitter / coco_spg samples of the same photos):

1. A = photo i, resized as coco_splice's host is (each side to crop_size * U(resize_range)),
   padded; up to `max_attempts` times: a random crop_size crop of A, another photo B (any but
   A, uniformly, from the same split) resized and cropped by the same law, and
   instance_forgery.splice with B's crop as the host and A's crop as the donor: the scale,
   mirror, candidate rules, placement and occlusion by B's own objects are that recipe's
   (data.instance_forgery; coco_splice's knobs).
2. 'mask' (on the forged image) is exactly the pixels written; 'donor_mask' (on the authentic
   image) is exactly the object pixels of A whose content was written: the written pixels
   mapped back through the paste (un-mirrored, rescaled by 1 / scale with nearest-neighbour
   sampling) and intersected with the object's mask. At scale 1 every masked forged pixel
   equals its donor pixel; at other scales it is their bilinear resampling.
3. No attempt succeeds (A's crops hold no qualifying object): A's last crop and B's come back
   with all-zero masks, kind 'authentic' (a valid pair of unrelated photos), counted in
   `fallback_count`.

Train and validation pairs come from disjoint photos: each split's pairs are drawn among its
own COCO split's photos ('train' / 'val'), as coco_spg's are. Samples hold 'authentic',
'forged', 'mask', 'donor_mask', 'has_mask' True, 'id' (A's name), 'donor_of' (B's name: the
photo the object went into), 'kind' ('sdg' or 'authentic'), 'is_jpeg' False (new composites,
held losslessly).
"""

import cv2
import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.input import coco, instance_forgery

# The random stream of coco_sdg (Object Jitter none, splice 1, copy-move 2, coco_spg 3,
# pair_synth 4).
_SDG_STREAM = 5


def donor_region(
  instance: np.ndarray, scale: float, flip: bool, written: np.ndarray, x: int, y: int
) -> np.ndarray:
  """bool (H, W) in the donor's frame: the pixels of `instance` (the donor object's mask) whose
  content `paste` wrote into the host, given the Forgery's scale, flip and top-left (x, y) and
  its written mask (in the host's frame).

  It repeats instance_forgery.cut_object's geometry (box, resize of the mask, mirror, trim to
  the resized mask's own box), maps each written pixel back to the object's box and keeps the
  object's pixels there."""
  instance = np.asarray(instance).astype(np.uint8, copy=False)
  bx, by, bw, bh = cv2.boundingRect(instance)
  out = np.zeros(instance.shape, bool)
  if bw == 0 or bh == 0:
    return out
  alpha = (instance[by : by + bh, bx : bx + bw] != 0).astype(np.float32)
  size = (max(1, round(bw * scale)), max(1, round(bh * scale)))
  if size != (bw, bh):
    alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
  alpha = alpha > 0.5
  if flip:
    alpha = alpha[:, ::-1]
  tx, ty, tw, th = cv2.boundingRect(alpha.view(np.uint8))
  # The written pixels in the frame of the resized (and mirrored) box.
  frame = np.zeros(alpha.shape, np.uint8)
  height, width = written.shape
  x0, y0 = max(0, x), max(0, y)
  x1, y1 = min(width, x + tw), min(height, y + th)
  if x0 < x1 and y0 < y1:
    frame[ty + y0 - y : ty + y1 - y, tx + x0 - x : tx + x1 - x] = written[y0:y1, x0:x1]
  if flip:
    frame = frame[:, ::-1]
  if frame.shape != (bh, bw):
    frame = cv2.resize(frame, (bw, bh), interpolation=cv2.INTER_NEAREST)
  out[by : by + bh, bx : bx + bw] = (frame != 0) & (instance[by : by + bh, bx : bx + bw] != 0)
  return out


class SDGSource:
  """The `coco_sdg:PATH` source (see the module docstring).

  Args:
    instances: coco.CocoInstances or coco.BuiltCocoInstances of one split (identical samples).
    crop_size: the side of both images.
    seed, split_id: with the index, the whole of a sample's randomness.
    config: instance_forgery.InstanceForgeryConfig, the paste's recipe.
    resize_range: each photo's sides are crop_size * U(resize_range) before cropping.
  """

  def __init__(
    self,
    instances,
    crop_size: int,
    seed: int,
    split_id: int,
    config: instance_forgery.InstanceForgeryConfig = instance_forgery.InstanceForgeryConfig(),
    resize_range: tuple[float, float] = (1.0, 1.5),
  ):
    if not isinstance(crop_size, (int, np.integer)) or isinstance(crop_size, bool) or crop_size < 1:
      raise UserInputError(f"coco_sdg: crop_size: expected a positive int, got {crop_size!r}")
    low, high = (float(v) for v in resize_range)
    if not 0 < low <= high:
      raise UserInputError(
        f"coco_sdg: resize_range: expected 0 < low <= high, got {resize_range!r}"
      )
    for name in ("rotation_range", "native_resolution", "authentic_prob", "host_jpeg_prob"):
      # The donor mask on A is rebuilt from the paste's scale, mirror and place (donor_region),
      # which a rotation would break; crops and fallbacks here follow their own rules.
      if getattr(config, name):
        raise UserInputError(
          f"coco_sdg: data.instance_forgery.{name} is not supported for SDG pairs (set it to 0)"
        )
    if len(instances) < 2:
      raise UserInputError(
        f"{instances!r}: coco_sdg needs at least 2 images with objects (a photo to paste "
        f"into other than the donor), got {len(instances)}"
      )
    self.instances, self.config = instances, config
    self.crop_size, self.resize_range = int(crop_size), (low, high)
    self.seed, self.split_id = int(seed), int(split_id)
    self.fallback_count = 0  # Per process, as the other COCO sources'.

  def __len__(self) -> int:
    return len(self.instances)

  def _crop(self, image, objects, rng):
    size = self.crop_size
    y = int(rng.integers(0, image.shape[0] - size + 1))
    x = int(rng.integers(0, image.shape[1] - size + 1))
    return (
      np.ascontiguousarray(image[y : y + size, x : x + size]),
      np.ascontiguousarray(objects[:, y : y + size, x : x + size]),
    )

  def _prepared(self, item, rng):
    image, objects = coco.random_resize(
      item["image"], item["instances"], rng, self.crop_size, self.resize_range
    )
    return coco.pad_to_crop(image, objects, self.crop_size)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    rng = np.random.default_rng([self.seed, self.split_id, _SDG_STREAM, index])
    donor = self.instances[index]
    donor_image, donor_objects = self._prepared(donor, rng)
    size = self.crop_size
    for _ in range(self.config.max_attempts):
      crop, crop_objects = self._crop(donor_image, donor_objects, rng)
      host_index = (index + 1 + int(rng.integers(len(self) - 1))) % len(self)
      host = self.instances[host_index]
      host_crop, host_objects = self._crop(*self._prepared(host, rng), rng)
      result = instance_forgery.splice(
        host_crop, crop, crop_objects, rng, self.config, host_objects
      )
      if result is not None:
        written = result.mask != 0
        donor_mask = donor_region(
          crop_objects[result.object_index], result.scale, result.flip, written, result.x, result.y
        )
        forged, mask, kind = result.image, result.mask, "sdg"
        donor_mask = donor_mask.astype(np.uint8) * np.uint8(255)
        break
    else:
      self.fallback_count += 1
      forged, kind = host_crop, "authentic"
      mask = np.zeros((size, size), np.uint8)
      donor_mask = np.zeros((size, size), np.uint8)
    return {
      "authentic": crop,
      "forged": forged,
      "mask": mask,
      "donor_mask": donor_mask,
      "has_mask": True,
      "id": donor["name"],
      "donor_of": host["name"],
      "kind": kind,
      "is_jpeg": False,
    }
