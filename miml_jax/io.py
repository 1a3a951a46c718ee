"""Reading and writing images and masks, with errors that name the file.

Images are uint8 RGB (H, W, 3); masks are uint8 (H, W). Everything goes through OpenCV, which
reads PNG / JPEG / TIFF / BMP / WebP; a file OpenCV cannot decode is reported, never skipped.
"""

import os

import cv2
import numpy as np

from miml_jax.errors import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


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


def read_image(path: str) -> np.ndarray:
  """Reads an image as uint8 RGB (H, W, 3); grey images are repeated, alpha is dropped."""
  return decode_image(read_bytes(path), os.fspath(path))


def decode_image(data: bytes, name: str) -> np.ndarray:
  """read_image for an encoded file's bytes; `name` is what errors call it."""
  array = _decode(data, name, cv2.IMREAD_UNCHANGED)
  if array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  elif array.dtype != np.uint8:
    raise UserInputError(f"{name}: unsupported pixel type {array.dtype}")
  if array.ndim == 2:
    return np.repeat(array[:, :, None], 3, axis=2)
  if array.shape[2] == 1:
    return np.repeat(array, 3, axis=2)
  if array.shape[2] == 4:
    array = array[:, :, :3]
  if array.shape[2] != 3:
    raise UserInputError(f"{name}: expected 1, 3 or 4 channels, got {array.shape[2]}")
  return np.ascontiguousarray(array[:, :, ::-1])


def read_mask(path: str) -> np.ndarray:
  """Reads a mask as uint8 (H, W) grey levels 0..255 (colour masks are converted to grey)."""
  return decode_mask(read_bytes(path), os.fspath(path))


def decode_mask(data: bytes, name: str) -> np.ndarray:
  """read_mask for an encoded file's bytes; `name` is what errors call it."""
  array = _decode(data, name, cv2.IMREAD_UNCHANGED)
  if array.dtype == np.uint16:
    array = (array >> 8).astype(np.uint8)
  elif array.dtype == bool:
    array = array.astype(np.uint8) * 255
  if array.ndim == 3:
    array = cv2.cvtColor(array[:, :, :3], cv2.COLOR_BGR2GRAY)
  return array.astype(np.uint8)


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
