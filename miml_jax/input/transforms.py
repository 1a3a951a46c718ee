"""Per-sample transforms of the training recipe and the label rules (docs/methods.md).

All transforms work on uint8 numpy arrays on the host (inside grain workers); normalisation to
ImageNet statistics happens on device (`normalize`), so batches cross to the accelerator as uint8.

Label rule for soft masks (MIML): grey < 8 -> 0 (pristine), > 192 -> 1 (tampered), anything in
between -> IGNORE_LABEL, which the loss skips. Binary 0/255 masks decode to 0/1 exactly.
"""

import dataclasses

import cv2
import jax.numpy as jnp
import numpy as np

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError

IGNORE_LABEL = 255
# ImageNet statistics in 0-255 units, RGB order (mmseg's img_norm_cfg).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def decode_label(mask: np.ndarray, low: int = 8, high: int = 192) -> np.ndarray:
  """Grey mask 0..255 -> uint8 labels {0, 1, IGNORE_LABEL}."""
  label = np.full(mask.shape, IGNORE_LABEL, np.uint8)
  label[mask < low] = 0
  label[mask > high] = 1
  return label


def normalize(images: jnp.ndarray, dtype=jnp.float32) -> jnp.ndarray:
  """uint8 RGB (..., 3) -> normalised float, on device."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def denormalize(x: jnp.ndarray) -> jnp.ndarray:
  """`normalize` undone: normalised (..., 3) -> float32 RGB on 0..255 (not rounded)."""
  mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
  std = jnp.asarray(IMAGENET_STD, jnp.float32)
  return x.astype(jnp.float32) * std + mean


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The training augmentations; defaults are the APSC-Net recipe."""

  # Ranges and probabilities are checked by from_config (and config.validate), key named.
  crop_size: int = config_lib.setting(512, ge=32)
  # Each side is resized independently to crop_size * U(resize_range) (aspect not kept).
  resize_range: tuple[float, float] = config_lib.setting(
    (1.0, 1.5), check=config_lib.ordered_pair(0, low_open=True)
  )
  hflip: float = config_lib.probability(0.5)
  vflip: float = config_lib.probability(0.5)
  rot90: float = config_lib.probability(0.5)
  jpeg_prob: float = config_lib.probability(0.9)
  jpeg_quality: tuple[int, int] = config_lib.setting(
    (50, 100), check=config_lib.ordered_pair(0, 100)
  )
  # The JPEG probability instead for examples whose masks mark nothing, i.e. photos nobody
  # edited: an editor re-saves what it edits, while an untouched photo keeps the single
  # compression its camera gave it (0 here and 1 for jpeg_prob teaches that history). None:
  # jpeg_prob for every example. Examples without a mask field always take jpeg_prob.
  untouched_jpeg_prob: float | None = config_lib.setting(None, ge=0, le=1)
  rgb_shift_prob: float = config_lib.probability(0.3)
  rgb_shift: int = config_lib.setting(20, ge=0)
  mask_low: int = config_lib.setting(8, ge=0, le=255)
  mask_high: int = config_lib.setting(192, ge=0, le=255)

  @classmethod
  def from_config(cls, config) -> "AugmentConfig":
    return config_lib.settings_from_config(cls, config, "input.augment")


def _resize(array: np.ndarray, kind: str, height: int, width: int) -> np.ndarray:
  # Nearest for masks: interpolating would invent soft values at every edge.
  interpolation = cv2.INTER_LINEAR if kind == "image" else cv2.INTER_NEAREST
  return cv2.resize(array, (width, height), interpolation=interpolation)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
  ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  assert ok
  return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]


def augment_fields(
  fields: dict[str, np.ndarray], kinds: dict[str, str], rng: np.random.Generator, cfg: AugmentConfig
) -> dict[str, np.ndarray]:
  """The training augmentation of one example's named fields, e.g. {'image', 'mask'} or
  {'authentic', 'forged', 'mask'}; `kinds` maps each to 'image' (uint8 RGB) or 'mask' (grey).

  One geometric draw (resize, crop, flips, rot90) moves every field alike, so aligned fields
  stay aligned; then each image gets its own JPEG and RGB-shift draws, in field order; masks
  become labels {0, 1, IGNORE_LABEL}. Images of one example must share a size. With a single
  image and mask the draws are those of `train_augment`, in the same order.
  """
  sizes = {fields[k].shape[:2] for k in fields}
  if len(sizes) > 1:
    raise ValueError(
      f"augment_fields: fields of one example differ in size: "
      f"{ {k: fields[k].shape[:2] for k in fields} }"
    )
  (source_hw,) = sizes
  size = cfg.crop_size
  lo, hi = cfg.resize_range
  height = int(round(size * rng.uniform(lo, hi)))
  width = int(round(size * rng.uniform(lo, hi)))
  out = dict(fields)
  if (height, width) != source_hw:
    out = {k: _resize(v, kinds[k], height, width) for k, v in out.items()}
  # Random crop; images smaller than the crop were resized up above (resize_range >= 1), but a
  # config may allow < 1, so pad masks with ignore labels rather than fail.
  pad_h, pad_w = max(0, size - height), max(0, size - width)
  if pad_h or pad_w:
    out = {
      k: (
        np.pad(v, ((0, pad_h), (0, pad_w), (0, 0)))
        if kinds[k] == "image"
        else np.pad(v, ((0, pad_h), (0, pad_w)), constant_values=128)
      )  # 128: ignore.
      for k, v in out.items()
    }
  full_h, full_w = max(height, size), max(width, size)
  y = int(rng.integers(0, full_h - size + 1))
  x = int(rng.integers(0, full_w - size + 1))
  out = {k: v[y : y + size, x : x + size] for k, v in out.items()}
  jpeg_prob = cfg.jpeg_prob
  if cfg.untouched_jpeg_prob is not None:
    # Untouched: no mask pixel above the authentic band, in the whole example before the crop
    # (a crop that misses the edit is still a part of an edited, re-saved photo).
    masks = [v for k, v in fields.items() if kinds[k] == "mask"]
    if masks and not any((m > cfg.mask_low).any() for m in masks):
      jpeg_prob = cfg.untouched_jpeg_prob
  if rng.random() < cfg.hflip:
    out = {k: v[:, ::-1] for k, v in out.items()}
  if rng.random() < cfg.vflip:
    out = {k: v[::-1] for k, v in out.items()}
  if rng.random() < cfg.rot90:
    turns = int(rng.integers(1, 4))
    out = {k: np.rot90(v, turns) for k, v in out.items()}
  for key in out:
    value = np.ascontiguousarray(out[key])
    if kinds[key] == "image":
      if rng.random() < jpeg_prob:
        value = jpeg_roundtrip(
          value, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        )
      if rng.random() < cfg.rgb_shift_prob:
        shift = rng.integers(-cfg.rgb_shift, cfg.rgb_shift + 1, size=3)
        value = np.clip(value.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    else:
      value = decode_label(value, cfg.mask_low, cfg.mask_high)
    out[key] = np.ascontiguousarray(value)
  return out


def train_augment(
  image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Random resize, crop, flips, rot90, JPEG, RGB shift of one image and its mask.

  Returns (uint8 image, uint8 label); `augment_fields` with {'image', 'mask'}.
  """
  out = augment_fields({"image": image, "mask": mask}, {"image": "image", "mask": "mask"}, rng, cfg)
  return out["image"], out["mask"]


def test_size(height: int, width: int, is_jpeg: bool, rule: str = "miml") -> tuple[int, int]:
  """The size an image is scored at: its own ('none'), or the MIML protocol's test-time rule
  ('miml'): area >= 1536^2 -> 976 x 976; area > 512^2 or not a JPEG -> its own size;
  otherwise (small JPEGs such as CASIA v1) -> 512 x 512."""
  if rule == "none":
    return height, width
  if rule != "miml":
    raise UserInputError(f"resize '{rule}': expected 'none' or 'miml'")
  area = height * width
  if area >= 1536 * 1536:
    return 976, 976
  if area > 512 * 512 or not is_jpeg:
    return height, width
  return 512, 512


def resize_image(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of an image or a float map to (height, width)."""
  return cv2.resize(array, (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def pad_to_multiple(image: np.ndarray, multiple: int = 32) -> tuple[np.ndarray, tuple[int, int]]:
  """Pads (H, W, C) at the bottom/right with the ImageNet mean colour (zero after normalising).

  The network's strides need sizes divisible by 32; padding keeps every original pixel (the
  prediction is cropped back), where resizing would destroy the traces we look for.
  """
  height, width = image.shape[:2]
  target_h = -(-height // multiple) * multiple
  target_w = -(-width // multiple) * multiple
  if (target_h, target_w) == (height, width):
    return image, (height, width)
  padded = np.empty((target_h, target_w, image.shape[2]), image.dtype)
  padded[...] = np.round(IMAGENET_MEAN).astype(image.dtype)
  padded[:height, :width] = image
  return padded, (height, width)
