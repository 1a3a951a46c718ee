"""Reading and writing images and masks, with errors that name the file.

Images are uint8 RGB (H, W, 3); masks are uint8 (H, W). Everything goes through OpenCV, which
reads PNG / JPEG / TIFF / BMP / WebP; a file OpenCV cannot decode is reported, never skipped.
"""

import contextlib
import io as _io
import os
import struct
import sys

import cv2
import numpy as np

from miml_jax.errors import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

# Images with more pixels are refused from their header, before decoding (a decompression bomb
# is a small file that decodes to gigabytes: 20000 x 20000 zeros are a 400 KB PNG). 2**28 =
# 16384^2 = 268 M pixels admits every camera image (200 MP phone sensors are 16320 x 12240)
# and refuses such bombs. `data.max_image_pixels` sets it for eval / predict / the demo
# (image_pixel_limit).
DEFAULT_MAX_IMAGE_PIXELS = 2**28
_max_image_pixels = DEFAULT_MAX_IMAGE_PIXELS


def read_bytes(path: str) -> bytes:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserInputError(f"{path}: no such file")
  with open(path, "rb") as f:
    return f.read()


def _decode(data: bytes, name: str, flags: int) -> np.ndarray:
  buffer = np.frombuffer(data, dtype=np.uint8)
  array = cv2.imdecode(buffer, flags) if buffer.size else None
  if array is None:
    raise UserInputError(f"{name}: not a readable image (empty, truncated or unknown format)")
  return array


def _read(path: str, flags: int) -> np.ndarray:
  # Reading the bytes first also handles non-ASCII paths, which cv2.imread does not.
  return _decode(read_bytes(path), os.fspath(path), flags)


def read_image(path: str, max_pixels: int | None = None) -> np.ndarray:
  """Reads an image as uint8 RGB (H, W, 3); grey images are repeated, alpha is dropped.
  Images over `max_pixels` (default: the current image_pixel_limit) are refused from their
  header, before they are decoded."""
  return decode_image(read_bytes(path), os.fspath(path), max_pixels)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> np.ndarray:
  """read_image for an encoded file's bytes; `name` is what errors call it."""
  limit = _max_image_pixels if max_pixels is None else max_pixels
  size = header_size(data, name, limit)
  if size is not None:
    check_image_pixels(name, *size, limit)
  array = _decode(data, name, cv2.IMREAD_UNCHANGED)
  check_image_pixels(name, array.shape[1], array.shape[0], limit)  # A header we could not read.
  if array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise UserInputError(f"{name}: unsupported pixel type {array.dtype}")
  if array.ndim == 2 or array.shape[2] == 1:
    return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
  if array.shape[2] == 4:
    return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
  if array.shape[2] != 3:
    raise UserInputError(f"{name}: expected 1, 3 or 4 channels, got {array.shape[2]}")
  # In place: a reversed copy would double the peak memory of a large photo.
  return cv2.cvtColor(array, cv2.COLOR_BGR2RGB, dst=array)


def max_image_pixels() -> int:
  """The pixel limit read_image / decode_image apply when they are not given one."""
  return _max_image_pixels


@contextlib.contextmanager
def image_pixel_limit(limit: int):
  """Within the block read_image / decode_image refuse images over `limit` pixels
  (data.max_image_pixels); the previous limit is restored after it. Process-wide, so reader
  threads see it too."""
  global _max_image_pixels
  previous, _max_image_pixels = _max_image_pixels, int(limit)
  try:
    yield
  finally:
    _max_image_pixels = previous


RAISE_LIMIT = "if the image is genuine, raise it with --config.data.max_image_pixels=N"


def check_image_pixels(name: str, width: int, height: int, limit: int, hint: str = RAISE_LIMIT):
  """The one-line refusal of an image over `limit` pixels."""
  if width * height > limit:
    raise UserInputError(
      f"{name}: {width}x{height} is {width * height:,} pixels, over the limit of {limit:,} "
      f"(a decompression bomb?); {hint}"
    )


def header_size(
  source, name: str, limit: int | None = None, hint: str = RAISE_LIMIT
) -> tuple[int, int] | None:
  """(width, height) of an image (a path, or a file's bytes) from its header, without decoding
  it; None if the header does not say (then decoding decides whether it is an image at all).

  PNG and JPEG headers are read here (exactly, at any size); other formats through Pillow,
  whose own bomb check will not say beyond 2 x Image.MAX_IMAGE_PIXELS (179 M): such a file is
  refused if `limit` is below that, else None (and its decoded size is checked).
  """
  data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_bytes(source)
  size = _png_size(data) or _jpeg_size(data)
  return size if size is not None else _pillow_size(data, name, limit, hint)


def _png_size(data) -> tuple[int, int] | None:
  # The signature, then the IHDR chunk: length, b'IHDR', width, height (big-endian).
  if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
    return struct.unpack(">II", data[16:24])
  return None


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic, ...): 0xC0 to 0xCF
# but DHT (0xC4), JPG (0xC8) and DAC (0xCC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data) -> tuple[int, int] | None:
  """(width, height) from a JPEG's frame header: segments are skipped by their lengths up to
  the first start-of-frame, so only the header is read, however large the file."""
  if data[:2] != b"\xff\xd8":
    return None
  position, end = 2, len(data)
  while position + 4 <= end:
    if data[position] != 0xFF:
      return None
    marker = data[position + 1]
    if marker == 0xFF:  # A fill byte.
      position += 1
    elif marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # Markers without a length.
      position += 2
    elif marker in (0xD9, 0xDA):  # End of image, or a scan before any frame header.
      return None
    elif marker in _JPEG_SOF:
      if position + 9 > end:
        return None
      height, width = struct.unpack(">HH", data[position + 5 : position + 9])
      return (width, height) if height and width else None  # Height 0: given later (DNL).
    else:
      position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
  return None


def _pillow_size(data, name: str, limit: int | None, hint: str) -> tuple[int, int] | None:
  import warnings

  from PIL import Image

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # We check the size.
      with Image.open(_io.BytesIO(data)) as image:
        return image.size
  except Image.DecompressionBombError:
    refused = 2 * Image.MAX_IMAGE_PIXELS
    if limit is not None and limit < refused:
      raise UserInputError(
        f"{name}: more than {refused:,} pixels by its header, over the limit of {limit:,} "
        f"(a decompression bomb?); {hint}"
      ) from None
    return None
  except (OSError, ValueError, SyntaxError):
    return None


def read_mask(path: str, dataset: str | None = None) -> np.ndarray:
  """Reads a mask as uint8 (H, W) grey levels 0..255, exactly as the official MIML scripts'
  `cv2.imread(path, 0)` (IMREAD_GRAYSCALE) reads it; see decode_mask."""
  return decode_mask(read_bytes(path), os.fspath(path), dataset)


# Colour masks: a channel spread above this (8-bit levels) at any pixel is colour, not grey (JPEG
# noise on a grey mask stored as colour stays well below it).
COLOUR_TOLERANCE = 8
_colour_reported: set[str] = set()  # datasets whose colour masks were reported (once each)


def decode_mask(data: bytes, name: str, dataset: str | None = None) -> np.ndarray:
  """read_mask for an encoded file's bytes; `name` is what errors call it.

  The grey levels are OpenCV's IMREAD_GRAYSCALE decoding, bit for bit what `cv2.imread(path,
  cv2.IMREAD_GRAYSCALE)` gives (the official MIML scripts' reading): colour is converted by the
  decoder itself (a PNG's by libpng: pure red -> 76, BGR (0, 1, 0) -> 0), 16-bit files are
  reduced to 8 bits, palettes expanded, alpha dropped.

  A mask with colour content (channels that differ by more than COLOUR_TOLERANCE somewhere) is
  read the same way but reported, once per `dataset`, with its file name, on stderr: its grey
  levels are probably not what its colours meant (pure red reads 76, which training decodes as
  "ignore"). `dataset` defaults to the text before '[' of a record name ('tfds:x/y[id] mask'),
  else the mask's folder (the folder above for a per-example `mask.<ext>`, the pair layout).
  """
  array = _decode(data, name, cv2.IMREAD_GRAYSCALE)
  key = dataset if dataset is not None else _mask_dataset(name)
  if key not in _colour_reported and _may_hold_colour(data):
    spread, count = _colour_spread(data)
    if spread > COLOUR_TOLERANCE:
      _colour_reported.add(key)
      print(
        f"warning: {name}: colour mask (channels differ by up to {spread} levels at {count} "
        f"pixels); read as grey as cv2.imread(path, IMREAD_GRAYSCALE) reads it (pure red -> "
        f"76, which training decodes as 'ignore'). Further colour masks of {key} are not "
        "reported.",
        file=sys.stderr,
        flush=True,
      )
  return array


def _mask_dataset(name: str) -> str:
  if "[" in name:
    return name.split("[", 1)[0]
  folder = os.path.dirname(os.path.abspath(name))
  stem = os.path.splitext(os.path.basename(name))[0]
  return os.path.dirname(folder) if stem.lower() == "mask" else folder


def _may_hold_colour(data: bytes) -> bool:
  # A PNG says in its header whether it is grey (colour type 0, or 4 with alpha): no second decode.
  head = np.frombuffer(data, np.uint8)[:26].tobytes()
  if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 25:
    return head[25] not in (0, 4)
  return True


def _colour_spread(data: bytes) -> tuple[int, int]:
  """The largest channel spread (max - min over B, G, R, in 8-bit levels) of the file's pixels,
  and how many pixels exceed COLOUR_TOLERANCE; (0, 0) for a grey or unreadable file."""
  array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if array is None or array.ndim != 3 or array.shape[2] < 3:
    return 0, 0
  if array.dtype == np.uint16:
    array = array >> 8
  elif array.dtype != np.uint8:
    return 0, 0
  colour = array[:, :, :3]
  spread = colour.max(axis=2).astype(np.int16) - colour.min(axis=2)
  return int(spread.max()), int(np.count_nonzero(spread > COLOUR_TOLERANCE))


def read_soft_mask(path: str) -> np.ndarray:
  """Reads a soft mask as float32 probabilities in [0, 1] (8- / 16-bit integers are scaled,
  float images such as 32-bit TIFFs are taken as probabilities already)."""
  array = _read(path, cv2.IMREAD_UNCHANGED)
  if array.ndim == 3:
    if array.shape[2] < 3:
      raise UserInputError(f"{path}: a mask needs 1, 3 or 4 channels, got {array.shape[2]}")
    array = cv2.cvtColor(array[:, :, :3], cv2.COLOR_BGR2GRAY)
  if np.issubdtype(array.dtype, np.floating):
    return array.astype(np.float32)  # Float TIFFs already hold probabilities.
  scale = 65535.0 if array.dtype == np.uint16 else 255.0
  return array.astype(np.float32) / scale


def check_same_size(image: np.ndarray, mask: np.ndarray, image_path: str, mask_path: str):
  if image.shape[:2] != mask.shape[:2]:
    raise UserInputError(
      f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
      f"{image.shape[1]}x{image.shape[0]} (width x height)"
    )


def encode_image(image: np.ndarray, extension: str = ".png") -> bytes:
  """uint8 RGB (H, W, 3) or grey (H, W) -> the bytes of a file of that format."""
  if image.ndim == 3:
    image = image[:, :, ::-1]
  ok, data = cv2.imencode(extension, np.ascontiguousarray(image))
  if not ok:
    raise UserInputError(f"cannot encode an image as {extension}")
  return data.tobytes()


def write_image(path: str, image: np.ndarray):
  """Writes uint8 RGB (H, W, 3) or grey (H, W) to any format OpenCV knows from the extension."""
  try:
    data = encode_image(image, os.path.splitext(path)[1] or ".png")
  except UserInputError:
    raise UserInputError(f"{path}: cannot encode an image with this extension") from None
  with open(path, "wb") as f:
    f.write(data)


def list_images(folder: str) -> list[str]:
  """Sorted image files directly inside `folder`."""
  if not os.path.isdir(folder):
    raise UserInputError(f"{folder}: no such directory")
  return sorted(
    os.path.join(folder, name)
    for name in os.listdir(folder)
    if name.lower().endswith(IMAGE_EXTENSIONS)
  )
