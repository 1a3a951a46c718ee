"""The embedded default forgery dataset: procedural "photos" with exact manipulation masks.

`SyntheticForgeries` makes a small image-forgery dataset with no download, so that the default
job (train a tiny segmentation model on CPU, then evaluate IoU) runs anywhere. Each sample is
generated on the fly from `np.random.SeedSequence([seed, split_id, index])`, so it is the same in
any process and in any order, and train and validation are disjoint random streams.

A sample is built in three steps:

1. A procedural scene: a colour gradient, multi-octave value-noise texture, several textured
   shapes and a few lines, all drawn from one per-image "style" (palette, roughness), so a second
   scene of the same style has similar colours and textures.
2. A simulated camera: optional slight blur, sensor noise with a per-image sigma (1.5-5 on the
   0-255 scale), and JPEG at a per-image quality (80-95).
3. One manipulation kind, applied to 1-2 regions (smoothed random polygons, ellipses or rotated
   rectangles, with hard or soft edges) covering 3-35% of the image (about 12% on average):
   - "splice" (45%): the region comes from another scene of the same style that went through a
     clearly different camera (mostly much noisier, sometimes much cleaner; another JPEG
     quality; often enlarged), pasted with a JPEG grid misaligned with the host's and its
     colours matched to what it covers;
   - "copy_move" (20%): a region of the same image is pasted elsewhere, usually rescaled and
     rotated (resampling smooths its noise); the mask marks only the pasted target;
   - "local_edit" (35%): the region is re-processed in place: strong added noise, a JPEG at a
     very low quality, a Gaussian blur or a median filter.
   The composite is then often JPEG-compressed once more, as a saved forgery would be (the host
   is then double-compressed).

The manipulation changes local noise / compression / resampling statistics rather than colour,
so trivial predictors (all-zero, all-one, a grey-level threshold) score poorly. The traces are
deliberately strong, and mostly of the kind that adds high frequencies (noise, blocking): a
plain CNN without a high-pass front end learns those within a few hundred steps, but learns
missing noise (blur, clean donors) and resampling much more slowly. Copy-move is the hard kind.

Samples are bit-identical across processes on one machine; a different CPU or OpenCV build may
round a few pixels differently (OpenCV's SIMD code paths differ), which does not matter for
training.
"""

from collections.abc import Sequence
import dataclasses
import math
import os
from typing import Any

import cv2
import numpy as np

from miml_jax import io as miml_io
from miml_jax.errors import UserInputError

DEFAULT_NUM_EXAMPLES = {"train": 4096, "validation": 128}
# The split's number is part of the seed, so the splits are disjoint streams for any seed.
SPLIT_IDS = {"train": 0, "validation": 1}
KINDS = ("splice", "copy_move", "local_edit")
# Probabilities of KINDS: splices are the most common forgery in real datasets.
KIND_PROBABILITIES = (0.45, 0.2, 0.35)
MIN_IMAGE_SIZE = 32
# Bounds on the manipulated fraction of one image; the mean is about 0.12 by construction.
MIN_TAMPERED_FRACTION = 0.03
MAX_TAMPERED_FRACTION = 0.35


def _normal_table() -> np.ndarray:
  """Quantiles of N(0, 1) at the 256 probabilities (i + 0.5) / 256, rescaled to unit variance.

  Looking this table up with random bytes (cv2.LUT) gives Gaussian sensor noise about ten times
  faster than `Generator.standard_normal`, which would otherwise dominate the cost of a sample.
  256 levels (tails cut at 2.9 sigma) are plenty for noise that is then rounded to 8 bits. The
  table is computed from math.erf, so it does not depend on the numpy version.
  """
  x = np.linspace(-6.0, 6.0, 24001)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  table = np.interp((np.arange(256) + 0.5) / 256, cdf, x)
  return (table / table.std()).astype(np.float32)


_NORMAL_TABLE = _normal_table()


def _gaussian(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  """float32 noise of `shape`, approximately N(0, 1) (see `_normal_table`)."""
  count = int(np.prod(shape))
  index = np.frombuffer(rng.bytes(count), dtype=np.uint8).reshape(shape[0], -1)
  return cv2.LUT(index, _NORMAL_TABLE).reshape(shape)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip of a uint8 RGB image at `quality`."""
  # OpenCV assumes BGR; swapping keeps the luma / chroma split (and its subsampling) right.
  ok, data = cv2.imencode(
    ".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
  )
  if not ok:
    raise RuntimeError("OpenCV could not encode a JPEG")
  return cv2.cvtColor(cv2.imdecode(data, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _to_uint8(image: np.ndarray) -> np.ndarray:
  """Rounds (half to even) and saturates float32 to uint8, like np.clip(np.rint(x), 0, 255).

  OpenCV's saturating conversion is several times faster than the numpy expression.
  """
  return cv2.add(image, 0.0, dtype=cv2.CV_8U)


def _colourize(grey: np.ndarray, offset: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """offset + grey * scale per channel: (H, W) float32 -> (H, W, 3) float32.

  Built plane by plane and merged; numpy broadcasting over a trailing axis of 3 is slow.
  """
  return cv2.merge([grey * np.float32(scale[c]) + np.float32(offset[c]) for c in range(3)])


@dataclasses.dataclass(frozen=True)
class _Style:
  """What two scenes of one image share, so a splice donor looks like its host."""

  palette: np.ndarray  # (K, 3) float32 RGB colours.
  texture_amplitude: float  # Grey levels of the background texture.
  persistence: float  # Amplitude ratio between successive texture octaves (roughness).


@dataclasses.dataclass(frozen=True)
class _Camera:
  """One simulated camera pipeline (all on the 0-255 scale)."""

  noise_sigma: float
  blur_sigma: float  # 0 means no blur.
  jpeg_quality: int


def _sample_style(rng: np.random.Generator) -> _Style:
  base = rng.uniform(50.0, 200.0, size=3)
  # A narrow palette around one base colour keeps shapes, background and any splice donor in
  # the same colour family, so a region cannot be found by its colour.
  spread = rng.uniform(12.0, 40.0)
  palette = np.clip(base + rng.normal(0.0, spread, size=(5, 3)), 15.0, 240.0)
  return _Style(
    palette=palette.astype(np.float32),
    texture_amplitude=rng.uniform(8.0, 35.0),
    persistence=rng.uniform(0.45, 0.7),
  )


def _sample_camera(rng: np.random.Generator) -> _Camera:
  blur = rng.uniform(0.3, 0.6) if rng.random() < 0.2 else 0.0
  return _Camera(
    noise_sigma=float(np.exp(rng.uniform(np.log(1.5), np.log(5.0)))),
    blur_sigma=blur,
    jpeg_quality=int(rng.integers(80, 96)),
  )


def _contrasting_camera(rng: np.random.Generator, host: _Camera) -> _Camera:
  """A camera whose traces clearly differ from `host`'s.

  Mostly (85%) a much noisier one (sigma 15-28, at least 4x the host's), otherwise a much
  cleaner, usually blurred one; and a JPEG quality 12-25 apart. The contrast is large on
  purpose: a plain CNN (no high-pass front end, like the default models) learns to see strong
  added noise within a few hundred steps, but subtler noise differences or missing noise take
  it far longer (when this was tuned, a donor sigma of 15-28 rather than 10-22 raised the
  quickstart model's pixel AUC at step 400 from 0.66 to 0.74). Colour cannot reveal it.
  """
  if rng.random() < 0.85:
    sigma, blur = max(15.0, 4.0 * host.noise_sigma) * rng.uniform(1.0, 1.4), 0.0
  else:
    sigma = host.noise_sigma / rng.uniform(4.0, 8.0)
    blur = rng.uniform(0.7, 1.3) if rng.random() < 0.7 else 0.0
  step = int(rng.integers(12, 26))
  # For a host quality in [80, 95] at least one direction is always in [50, 99].
  options = [q for q in (host.jpeg_quality - step, host.jpeg_quality + step) if 50 <= q <= 99]
  quality = options[int(rng.integers(len(options)))]
  return _Camera(noise_sigma=sigma, blur_sigma=blur, jpeg_quality=quality)


def _value_noise(
  rng: np.random.Generator, height: int, width: int, channels: int, persistence: float
) -> np.ndarray:
  """Multi-octave value noise, float32 (H, W, channels), roughly unit variance.

  Octaves go from cells of half the image down to 4 pixels. They are summed on a pyramid of
  small random grids (each level bicubically upsampled to the next, finer grid, then its own
  noise added) and only the finest grid is resized to the full image, bilinearly: a full-size
  bicubic resize per octave would cost more than the rest of the sample.
  """
  cells = []
  cell = max(height, width) / 2.0
  while cell >= 4.0:
    cells.append(cell)
    cell /= 2.0
  accumulated = None
  amplitude, total = 1.0, 0.0
  for cell in cells:
    grid_h = max(2, int(round(height / cell)) + 1)
    grid_w = max(2, int(round(width / cell)) + 1)
    grid = rng.standard_normal((grid_h, grid_w, channels), dtype=np.float32) * np.float32(amplitude)
    if accumulated is not None:
      grid += cv2.resize(accumulated, (grid_w, grid_h), interpolation=cv2.INTER_CUBIC).reshape(
        grid.shape
      )
    accumulated = grid
    total += amplitude**2
    amplitude *= persistence
  out = cv2.resize(accumulated, (width, height), interpolation=cv2.INTER_LINEAR)
  return out.reshape(height, width, channels) / np.float32(np.sqrt(total))


_BLOB_ANGLES = np.arange(64) * (2 * np.pi / 64)
_BLOB_COS, _BLOB_SIN = np.cos(_BLOB_ANGLES), np.sin(_BLOB_ANGLES)
_BLOB_HARMONICS = np.arange(1, 5)[:, None]


def _random_shape(
  rng: np.random.Generator,
  height: int,
  width: int,
  area: float,
  center: tuple[float, float] | None = None,
) -> np.ndarray:
  """A filled shape of about `area` pixels as a uint8 (H, W) mask in {0, 255}.

  One of: a blob (a polygon whose radius is a smooth random function of the angle), an
  ellipse, a rotated rectangle.
  """
  radius = math.sqrt(area / math.pi)
  if center is None:
    # Keep most of the shape inside the image so its area is close to the target.
    margin_x = min(0.7 * radius, width / 2.0)
    margin_y = min(0.7 * radius, height / 2.0)
    center = (rng.uniform(margin_x, width - margin_x), rng.uniform(margin_y, height - margin_y))
  cx, cy = center
  canvas = np.zeros((height, width), np.uint8)
  form = rng.integers(3)
  if form == 0:
    # A few low harmonics of the angle give a smooth, irregular outline (no blur needed).
    weights = rng.uniform(-0.25, 0.25, size=(4, 1)) / _BLOB_HARMONICS
    phases = rng.uniform(0.0, 2 * np.pi, size=(4, 1))
    radii = radius * (
      1.0 + np.sum(weights * np.cos(_BLOB_HARMONICS * _BLOB_ANGLES + phases), axis=0)
    )
    points = np.stack([cx + radii * _BLOB_COS, cy + radii * _BLOB_SIN], axis=1)
    cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 255)
  elif form == 1:
    ratio = rng.uniform(0.4, 1.0)
    axis_a = radius / math.sqrt(ratio)
    axes = (max(1, int(round(axis_a))), max(1, int(round(axis_a * ratio))))
    cv2.ellipse(
      canvas, (int(round(cx)), int(round(cy))), axes, rng.uniform(0.0, 180.0), 0.0, 360.0, 255, -1
    )
  else:
    ratio = rng.uniform(0.35, 1.0)
    side = math.sqrt(area / ratio)
    box = ((cx, cy), (side, side * ratio), rng.uniform(0.0, 90.0) if rng.random() < 0.6 else 0.0)
    cv2.fillPoly(canvas, [np.round(cv2.boxPoints(box)).astype(np.int32)], 255)
  return canvas


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
  """Row and column slices around the nonzero pixels of `mask`, grown by `margin`."""
  x, y, w, h = cv2.boundingRect(mask)
  if w == 0 or h == 0:
    return None
  return (slice(max(0, y - margin), y + h + margin), slice(max(0, x - margin), x + w + margin))


def _scene(rng: np.random.Generator, style: _Style, height: int, width: int) -> np.ndarray:
  """A procedural scene, float32 RGB (H, W, 3) on the 0-255 scale, before any camera."""
  palette = style.palette
  first, second = rng.choice(len(palette), size=2, replace=False)
  # Background: a linear gradient between two palette colours along a random direction.
  angle = float(rng.uniform(0.0, 2 * np.pi))  # A Python float keeps the ramp float32.
  ys = (np.arange(height, dtype=np.float32) * np.float32(1 / (height - 1)) - 0.5)[:, None]
  xs = (np.arange(width, dtype=np.float32) * np.float32(1 / (width - 1)) - 0.5)[None, :]
  ramp = np.clip(0.5 + math.cos(angle) * xs + math.sin(angle) * ys, 0.0, 1.0)
  # Texture: channel 0 for the background, channels 1-2 for the shapes' own textures.
  texture = _value_noise(rng, height, width, 3, style.persistence)
  tint = (1.0 + rng.normal(0.0, 0.15, 3)).astype(np.float32)
  # Background = first + ramp * (second - first) + texture * amplitude, built plane by plane
  # (numpy broadcasting over a trailing axis of 3 is slow).
  delta = palette[second] - palette[first]
  amplitude = style.texture_amplitude * tint
  image = cv2.merge(
    [ramp * delta[c] + texture[:, :, 0] * amplitude[c] + palette[first][c] for c in range(3)]
  )
  area = float(height * width)
  for _ in range(int(rng.integers(2, 7))):
    mask = _random_shape(rng, height, width, area * rng.uniform(0.01, 0.12))
    box = _bounding_box(mask, margin=6)
    blur = rng.uniform(0.7, 2.0) if rng.random() < 0.5 else 0.0
    colour = palette[int(rng.integers(len(palette)))]
    channel = 1 + int(rng.integers(2))
    strength = np.float32(rng.uniform(5.0, 30.0)) * tint
    if box is None:
      continue
    # Only the shape's bounding box is touched: full-image blends would dominate the cost.
    mask = mask[box]
    if blur:
      # Out-of-focus objects: a soft edge.
      mask = cv2.GaussianBlur(mask, (0, 0), blur)
    alpha = mask.astype(np.float32) * np.float32(1 / 255)
    fill = _colourize(np.ascontiguousarray(texture[box][:, :, channel]), colour, strength)
    image[box] = cv2.blendLinear(image[box], fill, 1.0 - alpha, alpha)
  for _ in range(int(rng.integers(0, 4))):
    colour = palette[int(rng.integers(len(palette)))] * rng.uniform(0.6, 1.2)
    start = (int(rng.integers(width)), int(rng.integers(height)))
    end = (int(rng.integers(width)), int(rng.integers(height)))
    cv2.line(
      image, start, end, tuple(float(c) for c in colour), int(rng.integers(1, 4)), cv2.LINE_AA
    )
  return image


def _camera(rng: np.random.Generator, scene: np.ndarray, camera: _Camera) -> np.ndarray:
  """Runs `scene` (float32) through `camera`: blur, sensor noise, 8-bit rounding, JPEG."""
  image = scene
  if camera.blur_sigma > 0:
    image = cv2.GaussianBlur(image, (0, 0), camera.blur_sigma)
  image = image + _gaussian(rng, image.shape) * np.float32(camera.noise_sigma)
  return _jpeg(_to_uint8(image), camera.jpeg_quality)


def _feather(mask: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian-blurred uint8 `mask`, blurring only around its support (a full blur is slow)."""
  box = _bounding_box(mask, margin=int(math.ceil(3 * sigma)) + 1)
  if box is None:
    return mask
  out = np.zeros_like(mask)
  out[box] = cv2.GaussianBlur(mask[box], (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
  return out


def _regions(rng: np.random.Generator, height: int, width: int) -> list[np.ndarray]:
  """1-2 manipulation regions as float32 alpha maps in [0, 1].

  The ground truth is alpha >= 0.5; every region has some of it, and their union covers
  MIN_TAMPERED_FRACTION..MAX_TAMPERED_FRACTION of the image.
  """
  area = float(height * width)
  count = 1 if rng.random() < 0.7 else 2
  for _ in range(20):
    # Log-uniform total fraction: mostly small regions, some large ones; mean about 0.12.
    total = float(np.exp(rng.uniform(np.log(0.035), np.log(0.28))))
    share = rng.uniform(0.3, 0.7)
    shares = [1.0] if count == 1 else [share, 1.0 - share]
    alphas = []
    for part in shares:
      mask = _random_shape(rng, height, width, total * part * area)
      if rng.random() < 0.5:
        # A feathered paste, as editing tools do.
        mask = _feather(mask, rng.uniform(0.8, 2.5))
      alphas.append(mask.astype(np.float32) * np.float32(1 / 255))
    inside = [alpha >= 0.5 for alpha in alphas]
    fraction = np.count_nonzero(np.logical_or.reduce(inside)) / area
    # A region clipped away by the border would leave nothing to copy or blend.
    if MIN_TAMPERED_FRACTION <= fraction <= MAX_TAMPERED_FRACTION and all(
      np.count_nonzero(m) >= 0.01 * area for m in inside
    ):
      return alphas
  # Practically unreachable (20 failed draws in a row); a centred shape of a tenth of the image
  # lies (almost) entirely inside it, so its fraction is within bounds.
  mask = _random_shape(rng, height, width, 0.1 * area, center=(width / 2, height / 2))
  return [mask.astype(np.float32) * np.float32(1 / 255)]


def _blend(base: np.ndarray, other: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """base * (1 - alpha) + other * alpha for uint8 images, outside alpha's support a copy."""
  out = base.copy()
  box = _bounding_box((alpha > 0).view(np.uint8), margin=0)
  if box is not None:
    a = np.ascontiguousarray(alpha[box])
    out[box] = cv2.blendLinear(base[box], other[box], 1.0 - a, a)
  return out


def _splice(
  rng: np.random.Generator,
  host: np.ndarray,
  style: _Style,
  camera: _Camera,
  alphas: list[np.ndarray],
) -> np.ndarray:
  height, width = host.shape[:2]
  # The donor is larger by 8 pixels and cropped at an offset, so its JPEG 8x8 grid does not line
  # up with the host's (the usual trace of a spliced JPEG region).
  size = (height + 8, width + 8)
  # Half the donors are enlarged to fit, as pasted objects often are: interpolation smooths
  # their noise and spreads their JPEG grid. Generating them smaller is also cheaper.
  scale = rng.uniform(1.2, 1.6) if rng.random() < 0.5 else 1.0
  small = (int(math.ceil(size[0] / scale)), int(math.ceil(size[1] / scale)))
  donor = _camera(rng, _scene(rng, style, *small), _contrasting_camera(rng, camera))
  if scale != 1.0:
    donor = cv2.resize(donor, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
  dy, dx = 0, 0
  while dy == 0 and dx == 0:
    dy, dx = (int(v) for v in rng.integers(0, 8, size=2))
  donor = donor[dy : dy + height, dx : dx + width].astype(np.float32)
  out = host
  for alpha in alphas:
    inside = (alpha >= 0.5).view(np.uint8)
    # A forger matches the pasted colours to what they cover; a constant shift leaves the
    # donor's noise and compression traces intact.
    difference = np.subtract(cv2.mean(host, inside)[:3], cv2.mean(donor, inside)[:3])
    shift = difference * rng.uniform(0.6, 1.0)
    out = _blend(out, _to_uint8(donor + shift.astype(np.float32)), alpha)
  return out


def _copy_move(rng: np.random.Generator, image: np.ndarray, alphas: list[np.ndarray]) -> np.ndarray:
  height, width = image.shape[:2]
  out = image
  for alpha in alphas:
    rows, cols = np.nonzero(alpha >= 0.5)
    target = np.array([cols.mean(), rows.mean()])
    extent = np.array([np.ptp(cols) + 1, np.ptp(rows) + 1], dtype=np.float64)
    # A source centre far enough away that source and target barely overlap.
    for _ in range(10):
      source = np.array([rng.uniform(0, width), rng.uniform(0, height)])
      if np.any(np.abs(source - target) >= extent):
        break
    if rng.random() < 0.85:
      # Rescaled and rotated: interpolation smooths the copied noise (a resampling trace). The
      # scale stays 20% or more away from 1, or the trace is too faint to learn quickly.
      scale = rng.uniform(1.25, 1.6) if rng.random() < 0.5 else rng.uniform(0.6, 0.8)
      angle = np.deg2rad(rng.uniform(-25.0, 25.0))
      linear = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
      interpolation = cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC
    else:
      linear = np.eye(2)
      source = np.round(source - target) + target  # An integer shift: an exact copy.
      interpolation = cv2.INTER_NEAREST
    # The map from a target pixel p to the source pixel it copies: linear @ (p - target) + source.
    matrix = np.concatenate([linear, (source - linear @ target)[:, None]], axis=1)
    moved = cv2.warpAffine(
      image,
      matrix,
      (width, height),
      flags=interpolation | cv2.WARP_INVERSE_MAP,
      borderMode=cv2.BORDER_REFLECT_101,
    )
    out = _blend(out, moved, alpha)
  return out


def _local_edit(
  rng: np.random.Generator, image: np.ndarray, camera: _Camera, alphas: list[np.ndarray]
) -> np.ndarray:
  out = image
  for alpha in alphas:
    # Added noise and heavy re-compression (traces that add high frequencies) are the most
    # common, as they are the quickest for a small model to learn (see _contrasting_camera).
    operation = rng.choice(4, p=(0.45, 0.25, 0.15, 0.15))
    if operation == 0:
      # At least 4x the camera's own noise, so the region is clearly noisier than the rest.
      sigma = max(15.0, 4.0 * camera.noise_sigma) * rng.uniform(1.0, 1.4)
      edited = _to_uint8(image + _gaussian(rng, image.shape) * np.float32(sigma))
    elif operation == 1:
      # Far below the camera's 80-95, so the region shows coarse 8x8 blocking.
      edited = _jpeg(image, int(rng.integers(5, 16)))
    elif operation == 2:
      edited = cv2.GaussianBlur(image, (0, 0), rng.uniform(1.5, 3.0))
    else:
      edited = cv2.medianBlur(image, 3 if rng.random() < 0.6 else 5)
    out = _blend(out, edited, alpha)
  return out


def generate_sample(
  rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, str]:
  """One forgery from `rng`: (uint8 RGB image, uint8 mask in {0, 1}, kind)."""
  style = _sample_style(rng)
  camera = _sample_camera(rng)
  host = _camera(rng, _scene(rng, style, height, width), camera)
  kind = KINDS[int(rng.choice(len(KINDS), p=KIND_PROBABILITIES))]
  alphas = _regions(rng, height, width)
  if kind == "splice":
    image = _splice(rng, host, style, camera, alphas)
    recompress = 0.7
  elif kind == "copy_move":
    image = _copy_move(rng, host, alphas)
    recompress = 0.6
  else:
    image = _local_edit(rng, host, camera, alphas)
    recompress = 0.5
  if rng.random() < recompress:
    # Saving the forgery as JPEG: the host is now double-compressed.
    image = _jpeg(image, int(rng.integers(85, 98)))
  mask = (np.maximum.reduce(alphas) >= 0.5).astype(np.uint8)
  return image, mask, kind


def _check_image_size(image_size: Any) -> tuple[int, int]:
  if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
    size = (int(image_size), int(image_size))
  elif (
    isinstance(image_size, Sequence)
    and len(image_size) == 2
    and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
  ):
    size = (int(image_size[0]), int(image_size[1]))
  else:
    raise UserInputError(f"image_size: expected an int or (height, width), got {image_size!r}")
  if min(size) < MIN_IMAGE_SIZE:
    raise UserInputError(
      f"image_size: {image_size!r} is too small; height and width must be >= {MIN_IMAGE_SIZE}"
    )
  return size


class SyntheticForgeries:
  """Random-access source of synthetic forgeries (usable as a grain MapDataset source).

  Each item is a dict: 'image' uint8 (H, W, 3) RGB, 'mask' uint8 (H, W) in {0, 1} (1 =
  manipulated), 'kind' one of KINDS, 'id' like 'synthetic/train/000123'.
  """

  def __init__(
    self,
    split: str = "train",
    num_examples: int | None = None,
    image_size: int | tuple[int, int] = 128,
    seed: int = 0,
  ):
    """Creates the source.

    Args:
      split: 'train' or 'validation' (disjoint streams).
      num_examples: length of the source; DEFAULT_NUM_EXAMPLES[split] when None.
      image_size: an int for square images, or (height, width); each at least 32.
      seed: non-negative int; the same (seed, split, index) always gives the same sample.
    """
    if split not in SPLIT_IDS:
      raise UserInputError(
        f"split: unknown synthetic split {split!r}; expected one of {sorted(SPLIT_IDS)}"
      )
    if num_examples is None:
      num_examples = DEFAULT_NUM_EXAMPLES[split]
    if (
      not isinstance(num_examples, (int, np.integer))
      or isinstance(num_examples, bool)
      or num_examples < 1
    ):
      raise UserInputError(f"num_examples: expected a positive int, got {num_examples!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
      raise UserInputError(f"seed: expected a non-negative int, got {seed!r}")
    self.split = split
    self.num_examples = int(num_examples)
    self.height, self.width = _check_image_size(image_size)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
      raise TypeError(f"index must be an int, got {type(index).__name__}")
    index = int(index)
    if index < 0:
      index += self.num_examples  # Sequence semantics: -1 is the last sample.
    if not 0 <= index < self.num_examples:
      raise IndexError(
        f"index {index} out of range for synthetic/{self.split} of {self.num_examples}"
      )
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, SPLIT_IDS[self.split], index]))
    image, mask, kind = generate_sample(rng, self.height, self.width)
    return {"image": image, "mask": mask, "kind": kind, "id": f"synthetic/{self.split}/{index:06d}"}

  def __repr__(self) -> str:
    return (
      f"SyntheticForgeries(split={self.split!r}, num_examples={self.num_examples}, "
      f"image_size=({self.height}, {self.width}), seed={self.seed})"
    )


def export_folder(source: Any, out_dir: str, limit: int | None = None) -> int:
  """Writes `source` in the MIML folder layout and returns the number of samples written.

  Writes out_dir/imgs/<k>.png (RGB) and out_dir/masks/<k>.png (0 / 255) for k = 000000, ...,
  the same names in both folders. Refuses an out_dir whose imgs/ or masks/ already holds
  anything, so user data is never overwritten.

  Args:
    source: anything with __len__ and __getitem__ giving dicts with 'image' and 'mask' (0 / 1).
    out_dir: the folder to create or fill.
    limit: write at most this many samples (all when None).
  """
  if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
    raise UserInputError(f"limit: expected a non-negative int or None, got {limit!r}")
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise UserInputError(f"{out_dir}: exists and is not a directory")
  folders = [os.path.join(out_dir, "imgs"), os.path.join(out_dir, "masks")]
  for folder in folders:
    if os.path.isdir(folder) and os.listdir(folder):
      raise UserInputError(
        f"{folder}: already contains files; export into an empty or new directory"
      )
  for folder in folders:
    os.makedirs(folder, exist_ok=True)
  count = len(source) if limit is None else min(int(limit), len(source))
  for k in range(count):
    sample = source[k]
    name = f"{k:06d}.png"
    miml_io.write_image(os.path.join(folders[0], name), sample["image"])
    miml_io.write_image(
      os.path.join(folders[1], name), np.where(sample["mask"] > 0, 255, 0).astype(np.uint8)
    )
  return count
