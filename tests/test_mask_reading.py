"""Masks read as the official MIML scripts read them, `cv2.imread(path, 0)` (IMREAD_GRAYSCALE),
bit for bit; a mask with real colour content is reported once per dataset, grey ones never."""

import os
import struct
import zlib

import cv2
import numpy as np
import pytest

from miml_jax import io
from miml_jax.input import sources


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
  monkeypatch.setattr(io, "_colour_reported", set(), raising=False)


def _official(path):
  return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def _write(path, array, extension=".png"):
  ok, data = cv2.imencode(extension, array)
  assert ok
  path.write_bytes(data.tobytes())
  return path


def _palette_png(path, indices, palette):
  """An 8-bit palette PNG (colour type 3), written by hand (OpenCV cannot write one)."""

  def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  height, width = indices.shape
  rows = b"".join(b"\x00" + row.astype(np.uint8).tobytes() for row in indices)
  data = (
    b"\x89PNG\r\n\x1a\n"
    + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0))
    + chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    + chunk(b"IDAT", zlib.compress(rows))
    + chunk(b"IEND", b"")
  )
  path.write_bytes(data)
  return path


def test_masks_read_bit_for_bit_as_imread_grayscale(tmp_path, capsys):
  rng = np.random.default_rng(0)
  faint = rng.integers(0, 3, (40, 50, 3), dtype=np.uint8)  # BGR (0, 1, 0) and the like.
  faint[5, 5] = (0, 1, 0)
  files = {
    "faint colour": _write(tmp_path / "faint.png", faint),
    "colour": _write(tmp_path / "colour.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
    "grey": _write(tmp_path / "grey.png", rng.integers(0, 256, (40, 50), dtype=np.uint8)),
    "16-bit grey": _write(
      tmp_path / "grey16.png", rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    ),
    "16-bit colour": _write(
      tmp_path / "colour16.png", rng.integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    ),
    "alpha": _write(tmp_path / "alpha.png", rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)),
    "palette": _palette_png(
      tmp_path / "palette.png",
      rng.integers(0, 4, (40, 50)),
      [(0, 0, 0), (255, 0, 0), (0, 1, 0), (200, 120, 7)],
    ),
    "jpeg": _write(
      tmp_path / "colour.jpg", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), ".jpg"
    ),
  }
  for label, path in files.items():
    official = _official(path)
    assert official is not None, label
    mask = io.read_mask(str(path))
    assert mask.dtype == np.uint8 and mask.shape == official.shape, label
    np.testing.assert_array_equal(mask, official, err_msg=label)
    np.testing.assert_array_equal(io.decode_mask(path.read_bytes(), str(path)), official)
  assert io.read_mask(str(files["faint colour"]))[5, 5] == 0  # cvtColor would give 1.
  capsys.readouterr()


def test_a_colour_mask_is_reported_once_per_dataset(tmp_path, capsys):
  red = np.zeros((20, 30, 3), np.uint8)
  red[5:15, 5:20] = (0, 0, 255)  # Pure red in BGR.
  coloured = tmp_path / "coloured"
  for folder in ("imgs", "masks"):
    (coloured / folder).mkdir(parents=True)
  for k in range(3):
    _write(coloured / "imgs" / f"{k}.png", np.zeros((20, 30, 3), np.uint8))
    _write(coloured / "masks" / f"{k}.png", red)
  source = sources.make_source(f"folder:{coloured}", "validation")
  masks = [source[k]["mask"] for k in range(3)]
  assert all(int(m.max()) == 76 for m in masks)  # As cv2.imread(path, 0): read, not relabelled.
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("warning:")]
  assert len(lines) == 1, err
  assert os.path.join(str(coloured), "masks", "0.png") in lines[0]
  # Another dataset with colour masks is reported too, once.
  other = tmp_path / "other"
  other.mkdir()
  for k in range(2):
    io.read_mask(str(_write(other / f"{k}.png", red)))
  assert capsys.readouterr().err.count("warning:") == 1
  # A built dataset's records are one dataset whatever their ids; so are pair folders.
  data = _write(tmp_path / "r.png", red).read_bytes()
  for k in range(3):
    io.decode_mask(data, f"tfds:iml_benchmarks/casia1[{k}.png] mask")
  for k in range(3):
    pair = tmp_path / "pairs" / f"p{k}"
    pair.mkdir(parents=True)
    io.read_mask(str(_write(pair / "mask.png", red)))
  assert capsys.readouterr().err.count("warning:") == 2


def test_grey_masks_stay_silent(tmp_path, capsys):
  rng = np.random.default_rng(1)
  binary = np.where(rng.random((30, 40)) > 0.5, 255, 0).astype(np.uint8)
  _write(tmp_path / "binary.png", binary)
  _write(tmp_path / "grey_as_colour.png", np.repeat(binary[:, :, None], 3, axis=2))
  _write(tmp_path / "grey16.png", binary.astype(np.uint16) * 257)
  _write(tmp_path / "grey.jpg", np.repeat(binary[:, :, None], 3, axis=2), ".jpg")
  faint = np.repeat(binary[:, :, None], 3, axis=2)
  faint[::3, ::3, 1] += faint[::3, ::3, 1] < 255  # One level of colour: within tolerance.
  _write(tmp_path / "faint.png", faint)
  _palette_png(tmp_path / "palette.png", binary // 255, [(0, 0, 0), (255, 255, 255)])
  for name in sorted(os.listdir(tmp_path)):
    mask = io.read_mask(str(tmp_path / name))
    np.testing.assert_array_equal(mask, _official(tmp_path / name), err_msg=name)
  assert "colour mask" not in capsys.readouterr().err
