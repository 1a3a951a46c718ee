"""Synthetic splicing and copy-move from COCO instance masks: realistic forgeries with exact
ground truth, for pretraining without MIML (`coco_splice:PATH`, `coco_copymove:PATH`).

- splice: an object of ANOTHER COCO image (the donor), cut out by its instance mask, is pasted
  into the host crop;
- copy-move: an object of the host crop is copied to another place in the same crop.

Either way the object may be rescaled and mirrored, and may go behind the host's own objects.
The paste is hard-edged (alpha in {0, 1}), so the ground truth is exact: the mask is exactly the
pixels written, i.e. the object's (rescaled) mask, clipped to the crop, minus what an occluding
host object keeps. Every changed pixel is in the mask, and every mask pixel holds the pasted
object (it differs from what was there unless the two happen to be equal). The soft, resampled
seam is Object Jitter's kind of trace (object_jitter.py); these give the model the other two
classic kinds: foreign content (splice) and duplicated content (copy-move).

The recipe, one attempt (`splice`, `copy_move`; all randomness from one rng, drawn in this
order, so a given rng state always gives the same forgery):

1. A scale s ~ U(scale_range), and a horizontal mirror with p `flip_prob`.
2. The candidates: objects whose tight box, times s, is at least `min_side` px wide and high and
   whose pixel count, times s^2, is at least `min_area` (no tiny objects) and at most
   `max_object_fraction` of the crop (no object that would cover most of it). One is picked
   uniformly. No candidate: the attempt fails (None).
3. The cut: the object's tight box, resized by s (image bilinear, mask bilinear as a float and
   thresholded at 0.5), mirrored; the same three rules are checked again on the exact cut.
4. The place: the paste's centre is uniform over the crop, so it may hang over an edge (clipped).
   Copy-move: the clipped paste must not meet the source object's box (a copy elsewhere, not a
   jitter of the object over itself); up to `placement_tries` positions, else the attempt fails.
5. Occlusion: with p `occlude_prob` the host crop's objects (for copy-move, all but the copied
   one) stay in front: the pasted pixels under them are not written.
6. Fewer than `min_area` pixels written (mostly clipped or hidden): the attempt fails.

Realism switches (all off by default, which is the recipe above, unchanged draw for draw; each
draws from the same rng only when it is on). Real splices rarely are hard-edged pastes of an
object at the host's scale: the editor resamples, rotates, feathers and colour-matches the
donor, and the donor carries another camera's noise and another JPEG history. Each switch adds
one of those traces (docs/datasets.md, "Realistic splices"):

- `rotation_range` (degrees): the cut is rotated by U(-r, r) (bilinear; a resampling trace).
- `blur_prob` / `blur_sigma`: the donor patch is Gaussian-blurred (another lens, or the
  editor's softening).
- `noise_prob` / `noise_sigma`: Gaussian noise is added to the donor patch (noise-level
  mismatch between two cameras).
- `donor_jpeg_prob` / `donor_jpeg_quality`: the donor patch is JPEG-compressed on its own 8x8
  grid, which the paste's offset then misaligns with the host's (non-aligned double JPEG once
  the composite is compressed, e.g. by `input.augment.jpeg_prob`).
- `colour_match_prob`: the patch's per-channel mean and spread move towards the host pixels it
  covers by a strength U(0, 1) (the editor's colour balancing).
- `feather_prob` / `feather_width` (px): the paste's alpha ramps from 0 at the object's border
  to 1 at U(feather_width) px inside (a feathered selection). The mask is then the alpha itself
  as grey 0..255, so the label rule (< 8 pristine, > 192 tampered, ignored between) ignores the
  half-blended ring rather than calling it either.
- `native_resolution`: the host and donor photos keep their own pixels (no resize to the crop
  size, which would wash out the camera's noise and the photo's own JPEG grid) and crops start
  on the 8-px grid, so the host's JPEG blocks stay aligned: a crop recompressed by the augment is
  an aligned double JPEG, its pasted object (moved, rescaled) a non-aligned one.
- `host_jpeg_prob` / `host_jpeg_quality`: the host crop is JPEG-compressed before the edit (the
  camera's save; the editor's is `input.augment.jpeg_prob`'s), so an edited sample is an
  aligned double JPEG where it was left alone, while an untouched crop (`authentic_prob`) is
  not recompressed here. With the augment's JPEG on every sample, double compression then
  marks the edited images, whatever quality they end at.
- `authentic_prob`: a sample is the host crop unmodified with an all-zero mask (kind
  'authentic'), so a model also sees untouched photos with the same history (image-level
  negatives).

`InstanceForgerySource` makes one training sample per host image, deterministically per (seed,
split, mode, index), as coco.ObjectJitterSource does for Object Jitter: the host is resized as
there (each side to crop_size * U(resize_range)) and up to `max_attempts` random crops are tried
(a splice draws a new donor, never the host, for each, resized by the same law so its objects
are to the host's scale). If every attempt fails, the crop comes back unmodified with an
all-zero mask (kind 'authentic'), and `fallback_count` counts it.
"""

import dataclasses

import cv2
import numpy as np

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.input import coco, transforms

MODES = ("splice", "copy_move")
# Part of the seed, so the splice, copy-move and Object Jitter (seeded without it) streams of one
# host image differ.
_MODE_STREAMS = {"splice": 1, "copy_move": 2}
_HOST_JPEG_STREAM = 3


@dataclasses.dataclass(frozen=True)
class InstanceForgeryConfig:
  """The recipe's parameters (see the module docstring)."""

  min_side: int = 8
  # Smallest object (pixels, after scaling), and fewest pixels a paste must write.
  min_area: int = 256
  # Largest object (after scaling), as a fraction of the crop's area.
  max_object_fraction: float = 0.5
  scale_range: tuple[float, float] = (0.75, 1.25)
  flip_prob: float = 0.5
  occlude_prob: float = 0.3
  placement_tries: int = 10
  # Crops (and, for splices, donors) tried per sample before falling back to an authentic crop.
  max_attempts: int = 10
  # The realism switches (module docstring); the defaults switch every one off.
  rotation_range: float = 0.0
  blur_prob: float = 0.0
  blur_sigma: tuple[float, float] = (0.5, 1.5)
  noise_prob: float = 0.0
  noise_sigma: tuple[float, float] = (1.0, 4.0)
  donor_jpeg_prob: float = 0.0
  donor_jpeg_quality: tuple[int, int] = (60, 95)
  colour_match_prob: float = 0.0
  feather_prob: float = 0.0
  feather_width: tuple[float, float] = (1.0, 4.0)
  native_resolution: bool = False
  host_jpeg_prob: float = 0.0
  host_jpeg_quality: tuple[int, int] = (60, 95)
  authentic_prob: float = 0.0

  def __post_init__(self):
    for name in ("min_side", "min_area", "placement_tries", "max_attempts"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise UserInputError(f"instance_forgery.{name}: expected a positive int, got {value!r}")
    probabilities = ("max_object_fraction", "flip_prob", "occlude_prob", "blur_prob", "noise_prob")
    probabilities += ("donor_jpeg_prob", "colour_match_prob", "feather_prob", "authentic_prob")
    probabilities += ("host_jpeg_prob",)
    for name in probabilities:
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise UserInputError(f"instance_forgery.{name}: expected a value in [0, 1], got {value!r}")
    for name in ("scale_range", "blur_sigma", "feather_width"):
      low, high = getattr(self, name)
      if not 0 < low <= high:
        raise UserInputError(
          f"instance_forgery.{name}: expected 0 < low <= high, got {getattr(self, name)!r}"
        )
    low, high = self.noise_sigma
    if not 0 <= low <= high:
      raise UserInputError(
        f"instance_forgery.noise_sigma: expected 0 <= low <= high, got {self.noise_sigma!r}"
      )
    for name in ("donor_jpeg_quality", "host_jpeg_quality"):
      low, high = getattr(self, name)
      if not 1 <= low <= high <= 100:
        raise UserInputError(
          f"instance_forgery.{name}: expected 1 <= low <= high <= 100, got {getattr(self, name)!r}"
        )
    if not 0 <= self.rotation_range <= 180:
      raise UserInputError(
        f"instance_forgery.rotation_range: expected degrees in [0, 180], got "
        f"{self.rotation_range!r}"
      )

  @classmethod
  def from_config(cls, config) -> "InstanceForgeryConfig":
    return config_lib.settings_from_config(cls, config, "instance_forgery")


@dataclasses.dataclass(frozen=True)
class Forgery:
  """One splice or copy-move: the result and how it was made."""

  image: np.ndarray  # uint8 (H, W, 3), the composite
  # uint8 (H, W): exactly the pixels written, 255 (hard paste) or the paste's alpha as grey
  # 1..255 (feathered), 0 elsewhere.
  mask: np.ndarray
  object_index: int  # index of the pasted object in the instances it came from
  scale: float
  flip: bool
  x: int  # top-left of the pasted patch in the host (may be negative: clipped)
  y: int
  occluded: bool  # whether the host's objects were kept in front
  # Copy-move only: uint8 (H, W) in {0, 255}, the copied object's own pixels (its instance mask
  # in the host), the source the copy-move task's 3-class label needs; None for a splice.
  source_mask: np.ndarray | None = None


def _trim(patch: np.ndarray, alpha: np.ndarray):
  """(patch, alpha) cut to the tight box of the bool `alpha`; None if it is empty."""
  bx, by, bw, bh = cv2.boundingRect(alpha.view(np.uint8))
  if bw == 0 or bh == 0:
    return None
  return (
    np.ascontiguousarray(patch[by : by + bh, bx : bx + bw]),
    np.ascontiguousarray(alpha[by : by + bh, bx : bx + bw]),
  )


def cut_object(image: np.ndarray, instance: np.ndarray, scale: float = 1.0, flip: bool = False):
  """An object cut out of `image` by its mask: (patch, alpha) or None if the mask is empty.

  Args:
    image: uint8 (H, W, 3).
    instance: (H, W), nonzero = the object.
    scale: the patch's size is the object's tight box times `scale` (at least 1 px a side).
    flip: mirror left to right.

  Returns:
    patch: uint8 (h, w, 3), the image inside the (rescaled) box, bilinear;
    alpha: bool (h, w), the rescaled mask (bilinear, > 0.5), trimmed with the patch to its own
      tight box; at least one pixel is set, unless the result is None.
  """
  instance = np.asarray(instance).astype(np.uint8, copy=False)
  x, y, w, h = cv2.boundingRect(instance)
  if w == 0 or h == 0:
    return None
  patch, alpha = (
    image[y : y + h, x : x + w],
    (instance[y : y + h, x : x + w] != 0).astype(np.float32),
  )
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  if size != (w, h):
    patch = cv2.resize(patch, size, interpolation=cv2.INTER_LINEAR)
    alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_LINEAR)
  alpha = alpha > 0.5
  if flip:
    patch, alpha = patch[:, ::-1], alpha[:, ::-1]
  return _trim(patch, alpha)


def paste(
  host: np.ndarray,
  patch: np.ndarray,
  alpha: np.ndarray,
  x: int,
  y: int,
  occluder: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Pastes `patch` where `alpha` is set, its top-left at (x, y), onto a copy of `host`.

  `alpha` is bool (a hard paste) or float in [0, 1] (a blend, host * (1 - a) + patch * a). The
  patch may lie partly (or wholly) outside the host: what falls outside is dropped. Pixels
  where `occluder` (bool (H, W)) is set are not written.

  Returns:
    (image, written): the composite, and (H, W) the alpha each host pixel got: bool for a bool
    `alpha` (exactly the pixels written), float32 otherwise (0 where nothing was written).
  """
  height, width = host.shape[:2]
  soft = alpha.dtype != bool
  out = host.copy()
  written = np.zeros((height, width), np.float32 if soft else bool)
  x0, y0 = max(0, x), max(0, y)
  x1, y1 = min(width, x + patch.shape[1]), min(height, y + patch.shape[0])
  if x0 >= x1 or y0 >= y1:
    return out, written
  visible = alpha[y0 - y : y1 - y, x0 - x : x1 - x].copy()
  if occluder is not None:
    visible[occluder[y0:y1, x0:x1]] = 0
  source = patch[y0 - y : y1 - y, x0 - x : x1 - x]
  if soft:
    weight = visible[..., None].astype(np.float32)
    blend = out[y0:y1, x0:x1] * (1.0 - weight) + source * weight
    out[y0:y1, x0:x1] = np.clip(np.rint(blend), 0, 255).astype(np.uint8)
  else:
    np.copyto(out[y0:y1, x0:x1], source, where=visible[..., None])
  written[y0:y1, x0:x1] = visible
  return out, written


def _rotate(patch: np.ndarray, alpha: np.ndarray, degrees: float):
  """The cut rotated by `degrees` about its centre on a canvas that holds all of it (bilinear;
  the mask bilinear as a float, > 0.5), trimmed to the rotated mask's tight box; None if empty."""
  height, width = alpha.shape
  matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), degrees, 1.0)
  cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
  new_w = int(np.ceil(height * sin + width * cos))
  new_h = int(np.ceil(height * cos + width * sin))
  matrix[0, 2] += (new_w - width) / 2
  matrix[1, 2] += (new_h - height) / 2
  patch = cv2.warpAffine(patch, matrix, (new_w, new_h), flags=cv2.INTER_LINEAR)
  alpha = cv2.warpAffine(alpha.astype(np.float32), matrix, (new_w, new_h)) > 0.5
  return _trim(patch, alpha)


def _match_colour(patch, alpha, host, x, y, strength):
  """Moves the patch's per-channel mean and standard deviation (over its object pixels) by
  `strength` towards those of the host pixels the object will cover (its in-host part)."""
  height, width = host.shape[:2]
  x0, y0 = max(0, x), max(0, y)
  x1, y1 = min(width, x + patch.shape[1]), min(height, y + patch.shape[0])
  covered = alpha[y0 - y : y1 - y, x0 - x : x1 - x]
  if x0 >= x1 or y0 >= y1 or not covered.any():
    return patch
  target = host[y0:y1, x0:x1][covered].astype(np.float32)
  own = patch[alpha].astype(np.float32)
  # Spreads floored at 1 grey level: a flat patch is shifted, never divided by zero.
  mean, std = own.mean(0), np.maximum(own.std(0), 1.0)
  new_mean = (1 - strength) * mean + strength * target.mean(0)
  new_std = std ** (1 - strength) * np.maximum(target.std(0), 1.0) ** strength
  moved = (patch.astype(np.float32) - mean) * (new_std / std) + new_mean
  return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


def _feather(alpha: np.ndarray, width: float) -> np.ndarray:
  """A bool mask's alpha ramped from 1 / width at its border to 1 at `width` px inside."""
  inside = cv2.distanceTransform(
    np.pad(alpha.view(np.uint8), 1), cv2.DIST_L2, cv2.DIST_MASK_PRECISE
  )[1:-1, 1:-1]
  return np.clip(inside / width, 0.0, 1.0).astype(np.float32)


def _realise(host, patch, alpha, x, y, rng, cfg):
  """The donor-side and blending switches (blur, noise, donor JPEG, colour match, feather) on a
  patch placed at (x, y); each draws only when on. Returns (patch, alpha: bool or float)."""
  if cfg.blur_prob and rng.random() < cfg.blur_prob:
    patch = cv2.GaussianBlur(patch, (0, 0), float(rng.uniform(*cfg.blur_sigma)))
  if cfg.noise_prob and rng.random() < cfg.noise_prob:
    sigma = float(rng.uniform(*cfg.noise_sigma))
    noisy = patch + rng.normal(0.0, sigma, patch.shape).astype(np.float32)
    patch = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
  if cfg.donor_jpeg_prob and rng.random() < cfg.donor_jpeg_prob:
    low, high = cfg.donor_jpeg_quality
    patch = transforms.jpeg_roundtrip(np.ascontiguousarray(patch), int(rng.integers(low, high + 1)))
  if cfg.colour_match_prob and rng.random() < cfg.colour_match_prob:
    patch = _match_colour(patch, alpha, host, x, y, float(rng.uniform(0.0, 1.0)))
  if cfg.feather_prob and rng.random() < cfg.feather_prob:
    alpha = _feather(alpha, float(rng.uniform(*cfg.feather_width)))
  return patch, alpha


def _candidates(
  instances: np.ndarray,
  scale: float,
  crop_area: int,
  cfg: InstanceForgeryConfig,
  exclude: int | None = None,
) -> list[tuple[int, tuple]]:
  """(index, tight box) of the objects that qualify at `scale` (rule 2), in instance order."""
  out = []
  for index, instance in enumerate(instances):
    if index == exclude:
      continue
    x, y, w, h = cv2.boundingRect(instance)
    if min(w, h) * scale < cfg.min_side:
      continue
    area = cv2.countNonZero(instance[y : y + h, x : x + w]) * scale * scale
    if cfg.min_area <= area <= cfg.max_object_fraction * crop_area:
      out.append((index, (x, y, w, h)))
  return out


def _choose_and_cut(
  image: np.ndarray,
  instances: np.ndarray,
  crop_area: int,
  rng: np.random.Generator,
  cfg: InstanceForgeryConfig,
):
  """Rules 1-3: (object index, its box, scale, flip, patch, alpha) or None."""
  scale = float(rng.uniform(*cfg.scale_range))
  flip = bool(rng.random() < cfg.flip_prob)
  candidates = _candidates(instances, scale, crop_area, cfg)
  if not candidates:
    return None
  index, box = candidates[int(rng.integers(len(candidates)))]
  cut = cut_object(image, instances[index], scale, flip)
  if cut is None:
    return None
  patch, alpha = cut
  if cfg.rotation_range:
    rotated = _rotate(patch, alpha, float(rng.uniform(-cfg.rotation_range, cfg.rotation_range)))
    if rotated is None:
      return None
    patch, alpha = rotated
  count = int(np.count_nonzero(alpha))
  if (
    min(alpha.shape) < cfg.min_side
    or count < cfg.min_area
    or count > cfg.max_object_fraction * crop_area
  ):
    return None
  return index, box, scale, flip, patch, alpha


def _as_uint8(instances: np.ndarray) -> np.ndarray:
  return instances.view(np.uint8) if instances.dtype == bool else instances


def _finish(pasted, host_objects, index, scale, flip, x, y, rng, cfg, exclude=None):
  """Rules 5-6 for a patch placed at (x, y): the Forgery, or None."""
  host, patch, alpha = pasted
  occluded = bool(rng.random() < cfg.occlude_prob)
  occluder = None
  if occluded and len(host_objects):
    keep = [k for k in range(len(host_objects)) if k != exclude]
    occluder = np.any(host_objects[keep] != 0, axis=0) if keep else None
  patch, alpha = _realise(host, patch, alpha, x, y, rng, cfg)
  image, written = paste(host, patch, alpha, x, y, occluder)
  if np.count_nonzero(written >= 0.5) < cfg.min_area:
    return None
  if written.dtype == bool:
    mask = written.astype(np.uint8) * np.uint8(255)
  else:  # The alpha as grey, and at least 1 wherever anything was written.
    mask = np.where(written > 0, np.maximum(np.rint(written * 255), 1), 0).astype(np.uint8)
  return Forgery(
    image=image,
    mask=mask,
    object_index=index,
    scale=scale,
    flip=flip,
    x=x,
    y=y,
    occluded=occluded,
  )


def splice(
  host: np.ndarray,
  donor: np.ndarray,
  donor_instances: np.ndarray,
  rng: np.random.Generator,
  cfg: InstanceForgeryConfig = InstanceForgeryConfig(),
  host_instances: np.ndarray | None = None,
) -> Forgery | None:
  """Pastes an object of `donor` into `host` (rules 1-6 of the module docstring).

  Args:
    host: uint8 (H, W, 3), not modified.
    donor: uint8 (h, w, 3), any size; its objects are pasted at their own scale times s.
    donor_instances: (N, h, w) bool or uint8, nonzero = the object; N may be 0.
    rng: the only source of randomness.
    cfg: the recipe's parameters.
    host_instances: (M, H, W) masks of the host's objects, which may occlude the paste.

  Returns:
    The Forgery (its `object_index` indexes donor_instances), or None when no donor object
    qualifies or the paste writes fewer than cfg.min_area pixels; the caller then tries again.
  """
  height, width = host.shape[:2]
  chosen = _choose_and_cut(donor, _as_uint8(donor_instances), height * width, rng, cfg)
  if chosen is None:
    return None
  index, _, scale, flip, patch, alpha = chosen
  x = int(rng.integers(width)) - patch.shape[1] // 2
  y = int(rng.integers(height)) - patch.shape[0] // 2
  host_objects = (
    np.zeros((0, height, width), np.uint8) if host_instances is None else _as_uint8(host_instances)
  )
  return _finish((host, patch, alpha), host_objects, index, scale, flip, x, y, rng, cfg)


def copy_move(
  image: np.ndarray,
  instances: np.ndarray,
  rng: np.random.Generator,
  cfg: InstanceForgeryConfig = InstanceForgeryConfig(),
) -> Forgery | None:
  """Copies an object of `image` to a place that does not meet its own box (rules 1-6).

  Args:
    image: uint8 (H, W, 3), not modified.
    instances: (N, H, W) bool or uint8, the image's objects; N may be 0. The others may occlude
      the copy.
    rng: the only source of randomness.
    cfg: the recipe's parameters.

  Returns:
    The Forgery (its `object_index` indexes instances), or None when no object qualifies, no
    place within cfg.placement_tries is clear of the source, or the copy writes fewer than
    cfg.min_area pixels.
  """
  height, width = image.shape[:2]
  instances = _as_uint8(instances)
  chosen = _choose_and_cut(image, instances, height * width, rng, cfg)
  if chosen is None:
    return None
  index, (sx, sy, sw, sh), scale, flip, patch, alpha = chosen
  for _ in range(cfg.placement_tries):
    x = int(rng.integers(width)) - patch.shape[1] // 2
    y = int(rng.integers(height)) - patch.shape[0] // 2
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(width, x + patch.shape[1]), min(height, y + patch.shape[0])
    if not (x0 < sx + sw and sx < x1 and y0 < sy + sh and sy < y1):
      break
  else:
    return None
  result = _finish(
    (image, patch, alpha), instances, index, scale, flip, x, y, rng, cfg, exclude=index
  )
  if result is None:
    return None
  # The source never meets the target (rule 4), so the two masks are disjoint.
  source = (instances[index] != 0).astype(np.uint8) * np.uint8(255)
  return dataclasses.replace(result, source_mask=source)


class InstanceForgerySource:
  """The `coco_splice:PATH` and `coco_copymove:PATH` data sources (see the module docstring).

  Item i is a forgery made on host image i of `instances` (coco.CocoInstances or
  coco.BuiltCocoInstances: both give identical samples) with an rng drawn from (seed, split,
  mode, i). Items follow the source contract of `miml_jax.input.sources` ('mask' is the
  target, the pixels written), plus, for copy-move, 'source_mask' (the copied object's pixels,
  all zero for the fallback), and 'kind'
  ('splice', 'copy_move', or 'authentic' for the fallback) and 'donor' (the donor image's name:
  the host's own for copy-move, '' for the fallback). With `keep_host` they also hold
  'host_image', the crop before the paste (for `miml-jax data show`).
  """

  def __init__(
    self,
    instances,
    mode: str,
    crop_size: int,
    seed: int,
    split_id: int,
    config: InstanceForgeryConfig = InstanceForgeryConfig(),
    resize_range: tuple[float, float] = (1.0, 1.5),
    keep_host: bool = False,
  ):
    if mode not in MODES:
      raise UserInputError(f"instance forgery mode {mode!r}: expected one of {', '.join(MODES)}")
    if not isinstance(crop_size, (int, np.integer)) or isinstance(crop_size, bool) or crop_size < 1:
      raise UserInputError(f"crop_size: expected a positive int, got {crop_size!r}")
    low, high = (float(v) for v in resize_range)
    if not 0 < low <= high:
      raise UserInputError(f"resize_range: expected 0 < low <= high, got {resize_range!r}")
    if mode == "splice" and len(instances) < 2:
      raise UserInputError(
        f"{instances!r}: splicing needs at least 2 images with objects (a "
        f"donor other than the host), got {len(instances)}"
      )
    self.instances, self.mode = instances, mode
    self.crop_size, self.resize_range = int(crop_size), (low, high)
    self.seed, self.split_id = int(seed), int(split_id)
    self.config, self.keep_host = config, bool(keep_host)
    self.fallback_count = 0  # Per process, as ObjectJitterTransform's.

  def __len__(self) -> int:
    return len(self.instances)

  def _prepared(self, item, rng):
    """A photo and its objects as forgeries are made on: resized by the resize rule, or as
    they are (`native_resolution`); padded up to the crop either way."""
    image, objects = item["image"], item["instances"]
    if not self.config.native_resolution:
      image, objects = coco.random_resize(image, objects, rng, self.crop_size, self.resize_range)
    return coco.pad_to_crop(image, objects, self.crop_size)

  def _corner(self, length: int, rng) -> int:
    """A crop's offset along a side of `length` px; on the 8-px JPEG grid at native resolution."""
    room = length - self.crop_size
    if self.config.native_resolution:
      return 8 * int(rng.integers(0, room // 8 + 1))
    return int(rng.integers(0, room + 1))

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    rng = np.random.default_rng([self.seed, self.split_id, _MODE_STREAMS[self.mode], index])
    host = self.instances[index]
    size = self.crop_size
    image, objects = self._prepared(host, rng)
    untouched = bool(self.config.authentic_prob and rng.random() < self.config.authentic_prob)
    host_quality = None
    if not untouched and self.config.host_jpeg_prob:
      # Its own stream: the edit's draws are the same with and without the host JPEG.
      key = [self.seed, self.split_id, _MODE_STREAMS[self.mode], index, _HOST_JPEG_STREAM]
      host_rng = np.random.default_rng(key)
      if host_rng.random() < self.config.host_jpeg_prob:
        low, high = self.config.host_jpeg_quality
        host_quality = int(host_rng.integers(low, high + 1))
    for _ in range(0 if untouched else self.config.max_attempts):
      y, x = self._corner(image.shape[0], rng), self._corner(image.shape[1], rng)
      crop = np.ascontiguousarray(image[y : y + size, x : x + size])
      crop_objects = objects[:, y : y + size, x : x + size]
      if host_quality is not None:
        # The edit happens on the camera's JPEG.
        crop = transforms.jpeg_roundtrip(crop, host_quality)
      if self.mode == "splice":
        # Any image but the host, uniformly.
        donor_index = (index + 1 + int(rng.integers(len(self) - 1))) % len(self)
        donor = self.instances[donor_index]
        donor_image, donor_objects = self._prepared(donor, rng)
        result = splice(crop, donor_image, donor_objects, rng, self.config, crop_objects)
        donor_name = donor["name"]
      else:
        result = copy_move(crop, crop_objects, rng, self.config)
        donor_name = host["name"]
      if result is not None:
        sample = {
          "image": result.image,
          "mask": result.mask,
          "kind": self.mode,
          "donor": donor_name,
        }
        if result.source_mask is not None:
          sample["source_mask"] = result.source_mask
        break
    else:
      if untouched:  # Asked for (authentic_prob), not a fallback.
        y, x = self._corner(image.shape[0], rng), self._corner(image.shape[1], rng)
        crop = np.ascontiguousarray(image[y : y + size, x : x + size])
      else:
        self.fallback_count += 1
        # An unedited crop keeps its own history (no host JPEG: it was never edited).
        crop = np.ascontiguousarray(image[y : y + size, x : x + size])
      sample = {
        "image": crop,
        "mask": np.zeros((size, size), np.uint8),
        "kind": "authentic",
        "donor": "",
      }
      if self.mode == "copy_move":
        sample["source_mask"] = np.zeros((size, size), np.uint8)
    # A new composite, held losslessly: not a JPEG file any more.
    sample.update(id=host["name"], is_jpeg=False)
    if self.keep_host:
      sample["host_image"] = crop
    return sample
