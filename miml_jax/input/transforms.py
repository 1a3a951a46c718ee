"""Per-sample transforms of the training recipe (METHODS.md section 5) and the label rules.

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


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The training augmentations; defaults are the APSC-Net recipe."""
  crop_size: int = 512
  # Each side is resized independently to crop_size * U(resize_range) (aspect not kept).
  resize_range: tuple[float, float] = (1.0, 1.5)
  hflip: float = 0.5
  vflip: float = 0.5
  rot90: float = 0.5
  jpeg_prob: float = 0.9
  jpeg_quality: tuple[int, int] = (50, 100)
  rgb_shift_prob: float = 0.3
  rgb_shift: int = 20
  mask_low: int = 8
  mask_high: int = 192

  @classmethod
  def from_config(cls, config) -> "AugmentConfig":
    return config_lib.settings_from_config(cls, config, "input.augment")


def _resize(image, mask, height, width):
  image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
  # Nearest for labels: interpolating would invent soft values at every edge.
  mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
  return image, mask


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
  ok, data = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  assert ok
  return cv2.imdecode(data, cv2.IMREAD_COLOR)[:, :, ::-1]


def train_augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                  cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
  """Random resize, crop, flips, rot90, JPEG, RGB shift. Returns (uint8 image, uint8 label)."""
  size = cfg.crop_size
  lo, hi = cfg.resize_range
  height = int(round(size * rng.uniform(lo, hi)))
  width = int(round(size * rng.uniform(lo, hi)))
  if (height, width) != image.shape[:2]:
    image, mask = _resize(image, mask, height, width)
  # Random crop; images smaller than the crop were resized up above (resize_range >= 1), but a
  # config may allow < 1, so pad with ignore labels rather than fail.
  pad_h, pad_w = max(0, size - height), max(0, size - width)
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=128)  # 128 decodes to ignore.
  y = int(rng.integers(0, image.shape[0] - size + 1))
  x = int(rng.integers(0, image.shape[1] - size + 1))
  image, mask = image[y:y + size, x:x + size], mask[y:y + size, x:x + size]
  if rng.random() < cfg.hflip:
    image, mask = image[:, ::-1], mask[:, ::-1]
  if rng.random() < cfg.vflip:
    image, mask = image[::-1], mask[::-1]
  if rng.random() < cfg.rot90:
    k = int(rng.integers(1, 4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
  image = np.ascontiguousarray(image)
  if rng.random() < cfg.jpeg_prob:
    image = jpeg_roundtrip(image, int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)))
  if rng.random() < cfg.rgb_shift_prob:
    shift = rng.integers(-cfg.rgb_shift, cfg.rgb_shift + 1, size=3)
    image = np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)
  label = decode_label(np.ascontiguousarray(mask), cfg.mask_low, cfg.mask_high)
  return np.ascontiguousarray(image), label


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
