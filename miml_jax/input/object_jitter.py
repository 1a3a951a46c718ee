"""Object Jitter (see docs/methods.md): a manipulation made from one image, with no donor.

An object of the image is cut out by its instance mask, enlarged by about 12.5% and pasted back
over itself. The pasted object sits where the real one was and has its colours, so the only
evidence is what a real splice leaves behind: resampling of the pasted pixels and a seam at the
object's (slightly displaced) outline. The ground truth is exact, so COCO images with instance
masks become an unlimited source of hard, realistic training forgeries.

The recipe, per training crop:

1. Objects qualify if their tight box (recomputed from the cropped instance mask) is at least
   `min_side` px wide and high and the object covers at least `min_area` px; one is picked at
   random. No qualifying object -> no sample.
2. The box (h x w) and its mask are resized to (h + 2 round(h r), w + 2 round(w r)), r = 1/16,
   and pasted centred on the box, clipped at the crop's borders. With p `blur_prob` the alpha
   mask is Gaussian-blurred with a kernel chosen by min(h, w) (`blur_kernel_size`). The
   composite is patch * a + image * (1 - a).
3. The ground truth is a > 0.5 over the pasted extent.
4. If more than `second_min_count` other qualifying objects are disjoint from the first, with p
   `second_prob` one of them is jittered too.
5. A result whose tampered fraction is 0 or above `max_tampered_fraction` is rejected (None), so
   the caller draws another crop (`coco.ObjectJitterTransform` does, `max_attempts` times).

Reconstruction (the spec is silent; each is a field of `ObjectJitterConfig`):
- "box" means the tight box of the object's pixels inside the crop, so an object cut by the crop
  is judged and enlarged by its visible part.
- "area" is the object's pixel count, not its box's (`area_of="mask"`; "box" is the other option).
  The pixel count is what COCO calls an annotation's area.
- round() is Python's (half to even), as the spec's formula reads.
- The image patch is resized bilinearly; the mask patch is resized bilinearly as a float alpha in
  [0, 1], so the alpha's edge is soft by interpolation even without the blur.
- The blur uses OpenCV's default sigma for the kernel size (sigma=0) and its default border
  (reflect), so the alpha never leaves the pasted extent: outside it no pixel changes.
- A second object is "disjoint" when its own pasted extent (enlarged, clipped box) does not meet
  the first's (`second_disjoint="extent"`), which guarantees two separate tampered regions;
  "box" compares its tight box instead, as a looser reading of "non-overlapping boxes". Only
  qualifying objects are counted against `second_min_count`, as only they could be chosen.

Cost: every float operation touches only the pasted boxes; the full-crop work is one bounding
box and pixel count per instance mask and one pixel count of the result.
"""

import bisect
import dataclasses

import cv2
import numpy as np

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class ObjectJitterConfig:
  """Object Jitter's parameters; the defaults are the spec's (see the module docstring)."""

  min_side: int = 8
  min_area: int = 256
  # What min_area is compared with: "mask" (the object's pixel count) or "box" (w * h).
  area_of: str = "mask"
  # Each side of the box grows by 2 * round(side * enlarge_ratio).
  enlarge_ratio: float = 1.0 / 16.0
  blur_prob: float = 0.2
  # min(box w, h) < blur_thresholds[i] -> kernel blur_kernels[i]; at or above them all, the last
  # kernel. A kernel of 0 means no blur.
  blur_thresholds: tuple[int, ...] = (16, 32, 64, 128, 256)
  blur_kernels: tuple[int, ...] = (0, 3, 5, 7, 9, 11)
  # Gaussian sigma of the alpha blur; 0 lets OpenCV derive it from the kernel size.
  blur_sigma: float = 0.0
  second_min_count: int = 8
  second_prob: float = 0.5
  # What must not meet the first object's pasted extent: a candidate's "extent" or its "box".
  second_disjoint: str = "extent"
  max_tampered_fraction: float = 0.75
  # Crops tried per sample before giving up (used by coco.ObjectJitterTransform).
  max_attempts: int = 10

  def __post_init__(self):
    for name in ("min_side", "min_area", "second_min_count"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise UserInputError(f"object_jitter.{name}: expected a non-negative int, got {value!r}")
    if (
      not isinstance(self.max_attempts, (int, np.integer))
      or isinstance(self.max_attempts, bool)
      or self.max_attempts < 1
    ):
      raise UserInputError(
        f"object_jitter.max_attempts: expected a positive int, got {self.max_attempts!r}"
      )
    for name in ("blur_prob", "second_prob", "max_tampered_fraction"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise UserInputError(f"object_jitter.{name}: expected a value in [0, 1], got {value!r}")
    if self.enlarge_ratio < 0:
      raise UserInputError(
        f"object_jitter.enlarge_ratio: expected a non-negative value, got {self.enlarge_ratio!r}"
      )
    if self.area_of not in ("mask", "box"):
      raise UserInputError(f"object_jitter.area_of: expected 'mask' or 'box', got {self.area_of!r}")
    if self.second_disjoint not in ("extent", "box"):
      raise UserInputError(
        f"object_jitter.second_disjoint: expected 'extent' or 'box', got {self.second_disjoint!r}"
      )
    if list(self.blur_thresholds) != sorted(self.blur_thresholds):
      raise UserInputError(
        f"object_jitter.blur_thresholds: expected increasing sizes, got {self.blur_thresholds!r}"
      )
    if len(self.blur_kernels) != len(self.blur_thresholds) + 1:
      raise UserInputError(
        f"object_jitter.blur_kernels: expected {len(self.blur_thresholds) + 1} kernel sizes "
        f"(one more than blur_thresholds), got {len(self.blur_kernels)}"
      )
    for k in self.blur_kernels:
      if k != 0 and (k < 0 or k % 2 == 0):
        raise UserInputError(
          f"object_jitter.blur_kernels: kernel sizes must be 0 (no blur) or odd, got {k!r}"
        )

  @classmethod
  def from_config(cls, config) -> "ObjectJitterConfig":
    return config_lib.settings_from_config(cls, config, "object_jitter")


def blur_kernel_size(min_side: int, cfg: ObjectJitterConfig = ObjectJitterConfig()) -> int:
  """The alpha blur's kernel size for a box whose shorter side is `min_side` (0 = no blur)."""
  return cfg.blur_kernels[bisect.bisect_right(cfg.blur_thresholds, min_side)]


def _qualifying(instance_masks: np.ndarray, cfg: ObjectJitterConfig) -> list[tuple[int, tuple]]:
  """(index, (x, y, w, h)) of the objects that may be jittered, in instance order."""
  out = []
  for index, mask in enumerate(instance_masks):
    x, y, w, h = cv2.boundingRect(mask)
    if w < cfg.min_side or h < cfg.min_side:
      continue
    area = w * h if cfg.area_of == "box" else cv2.countNonZero(mask[y : y + h, x : x + w])
    if area >= cfg.min_area:
      out.append((index, (x, y, w, h)))
  return out


def _extent(box: tuple, height: int, width: int, ratio: float) -> tuple[tuple, tuple]:
  """The enlarged box (x0, y0, w, h), and that box clipped to the image as (x0, y0, x1, y1)."""
  x, y, w, h = box
  # Python's round, as in the spec; centred because the growth is 2 * pad on each axis.
  pad_x, pad_y = round(w * ratio), round(h * ratio)
  big = (x - pad_x, y - pad_y, w + 2 * pad_x, h + 2 * pad_y)
  clipped = (
    max(0, big[0]),
    max(0, big[1]),
    min(width, big[0] + big[2]),
    min(height, big[1] + big[3]),
  )
  return big, clipped


def _meets(a: tuple, b: tuple) -> bool:
  """Whether two (x0, y0, x1, y1) boxes share a pixel."""
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _jitter_one(
  image: np.ndarray,
  mask: np.ndarray,
  instance: np.ndarray,
  box: tuple,
  rng: np.random.Generator,
  cfg: ObjectJitterConfig,
):
  """Pastes the enlarged object over itself, in place on `image` and `mask` (uint8 0/255)."""
  height, width = image.shape[:2]
  x, y, w, h = box
  (bx, by, bw, bh), (x0, y0, x1, y1) = _extent(box, height, width, cfg.enlarge_ratio)
  patch = cv2.resize(image[y : y + h, x : x + w], (bw, bh), interpolation=cv2.INTER_LINEAR)
  alpha = cv2.resize(
    (instance[y : y + h, x : x + w] != 0).astype(np.float32),
    (bw, bh),
    interpolation=cv2.INTER_LINEAR,
  )
  if rng.random() < cfg.blur_prob:
    kernel = blur_kernel_size(min(w, h), cfg)
    if kernel:
      alpha = cv2.GaussianBlur(alpha, (kernel, kernel), cfg.blur_sigma)
  inside = (slice(y0 - by, y1 - by), slice(x0 - bx, x1 - bx))
  a = np.ascontiguousarray(alpha[inside])
  region = (slice(y0, y1), slice(x0, x1))
  # blendLinear divides by the weights' sum (+1e-5): where a = 0 the pixel comes back unchanged.
  image[region] = cv2.blendLinear(image[region], np.ascontiguousarray(patch[inside]), 1.0 - a, a)
  mask[region][a > 0.5] = 255


def object_jitter(
  image: np.ndarray,
  instance_masks: np.ndarray,
  rng: np.random.Generator,
  cfg: ObjectJitterConfig = ObjectJitterConfig(),
):
  """Jitters one or two objects of a crop: (uint8 image, uint8 mask in {0, 255}) or None.

  Args:
    image: uint8 (H, W, 3), not modified.
    instance_masks: (N, H, W) bool or uint8, nonzero = the object; N may be 0.
    rng: the only source of randomness, so a given rng state always gives the same result.
    cfg: the recipe's parameters.

  Returns:
    None when no object qualifies or the tampered fraction is 0 or above
    cfg.max_tampered_fraction; the caller should then try another crop.
  """
  height, width = image.shape[:2]
  if instance_masks.dtype == bool:
    instance_masks = instance_masks.view(np.uint8)
  candidates = _qualifying(instance_masks, cfg)
  if not candidates:
    return None
  out, mask = image.copy(), np.zeros((height, width), np.uint8)
  index, box = candidates[int(rng.integers(len(candidates)))]
  _jitter_one(out, mask, instance_masks[index], box, rng, cfg)
  _, first = _extent(box, height, width, cfg.enlarge_ratio)
  others = []
  for other, other_box in candidates:
    if other == index:
      continue
    if cfg.second_disjoint == "extent":
      region = _extent(other_box, height, width, cfg.enlarge_ratio)[1]
    else:
      region = (
        other_box[0],
        other_box[1],
        other_box[0] + other_box[2],
        other_box[1] + other_box[3],
      )
    if not _meets(region, first):
      others.append((other, other_box))
  if len(others) > cfg.second_min_count and rng.random() < cfg.second_prob:
    index, box = others[int(rng.integers(len(others)))]
    _jitter_one(out, mask, instance_masks[index], box, rng, cfg)
  fraction = cv2.countNonZero(mask) / (height * width)
  if fraction == 0 or fraction > cfg.max_tampered_fraction:
    return None
  return out, mask
