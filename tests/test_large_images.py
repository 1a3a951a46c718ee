"""Images of any size in bounded memory: the pixel budget of a batch, tiling (and downscaling)
of images over it, the decompression-bomb guard from the file header, and eval / predict on
12 and 48 megapixel images with default settings (the MIML test-time resize)."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from miml_jax import cli, io, predict
from miml_jax import config as config_lib
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline
from miml_jax.tasks import base
from tiny_run import QUICKSTART, TINY


# ---- cheap big images ---------------------------------------------------------------------
def write_png(path, width: int, height: int, row, channels: int = 3):
  """A PNG written row by row: `row(y)` -> the uint8 bytes of row y (width * channels). A
  constant image of any size costs a few hundred KB and no memory to make."""

  def chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

  colour_type = {1: 0, 3: 2}[channels]
  compressor = zlib.compressobj(6)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)))
    pending = []
    for y in range(height):
      pending.append(compressor.compress(b"\x00" + row(y)))
      if sum(map(len, pending)) > 1 << 20:
        f.write(chunk(b"IDAT", b"".join(pending)))
        pending = []
    pending.append(compressor.flush())
    f.write(chunk(b"IDAT", b"".join(pending)))
    f.write(chunk(b"IEND", b""))


def write_sample(root, stem: str, width: int, height: int):
  """imgs/<stem>.png, one grey-blue colour, and masks/<stem>.png with a tampered band."""
  os.makedirs(root / "imgs", exist_ok=True)
  os.makedirs(root / "masks", exist_ok=True)
  pixel = bytes((90, 110, 130)) * width
  write_png(root / "imgs" / f"{stem}.png", width, height, lambda y: pixel)
  inside = bytes(width // 4) + b"\xff" * (width // 4) + bytes(width - width // 2)
  outside = bytes(width)
  band = range(height // 4, height // 2)
  write_png(
    root / "masks" / f"{stem}.png",
    width,
    height,
    lambda y: inside if y in band else outside,
    channels=1,
  )


# ---- the decompression-bomb guard -------------------------------------------------------
def test_header_size_reads_png_jpeg_and_others(tmp_path):
  from PIL import Image

  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  for extension, options in (
    (".png", {}),
    (".jpg", {}),
    (".jpg", {"progressive": True, "exif": b"Exif\x00\x00" + bytes(3000)}),
    (".bmp", {}),
    (".tif", {}),
    (".webp", {}),
  ):
    path = tmp_path / f"x{extension}"
    Image.fromarray(image).save(path, **options)
    assert io.header_size(str(path), "x") == (53, 37), (extension, options)
    assert io.header_size(path.read_bytes(), "x") == (53, 37)
  assert io.header_size(b"not an image", "x") is None
  assert io.header_size(b"\xff\xd8\xff\xd9", "x") is None  # A JPEG without a frame header.


def test_bomb_is_refused_from_its_header(tmp_path):
  """20000 x 20000 zeros: a 400 MB image in a PNG of a few hundred KB, never decoded."""
  bomb = tmp_path / "bomb.png"
  zeros = bytes(20000)
  write_png(bomb, 20000, 20000, lambda y: zeros, channels=1)
  assert bomb.stat().st_size < 1_000_000
  with pytest.raises(UserInputError) as raised:
    io.read_image(str(bomb))
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"{bomb}: 20000x20000 is 400,000,000 pixels, over the limit of ")
  assert "--config.data.max_image_pixels=N" in message
  # The limit is a setting, and the guard applies to decode_image (tfds:, pairs:) too.
  small = tmp_path / "small.png"
  io.write_image(str(small), np.zeros((40, 50, 3), np.uint8))
  with io.image_pixel_limit(1999):
    with pytest.raises(UserInputError, match=r"small.png: 50x40 is 2,000 pixels, over .* 1,999"):
      io.decode_image(small.read_bytes(), "small.png")
  assert io.read_image(str(small)).shape == (40, 50, 3)
  assert io.max_image_pixels() == io.DEFAULT_MAX_IMAGE_PIXELS
  defaults = {f.name: f.default for f in config_lib.DataConfig.__dataclass_fields__.values()}
  assert defaults["max_image_pixels"] == io.DEFAULT_MAX_IMAGE_PIXELS


def test_decoding_keeps_pixels_exactly(tmp_path):
  """decode_image converts in place (no reversed copy): the same pixels as before."""
  rng = np.random.default_rng(1)
  for shape in ((30, 41, 3), (30, 41), (30, 41, 4)):
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    data = cv2.imencode(".png", array)[1].tobytes()
    decoded = io.decode_image(data, "x.png")
    if array.ndim == 2:
      want = np.repeat(array[:, :, None], 3, axis=2)
    else:
      want = array[:, :, :3][:, :, ::-1]
    assert decoded.flags.c_contiguous and np.array_equal(decoded, want), shape


# ---- the pixel budget of a batch -----------------------------------------------------------
class Sizes:
  def __init__(self, sizes):
    self.sizes = sizes

  def __len__(self):
    return len(self.sizes)

  def __getitem__(self, index):
    height, width = self.sizes[index]
    return {"image": np.zeros((height, width, 3), np.uint8), "mask": None}


def test_pixel_budget_splits_batches():
  sizes = [(64, 64)] * 10 + [(128, 128)] * 5 + [(256, 256)] * 2
  budget = 128 * 128 * 2  # Per device: 8 rows of 64^2, 2 of 128^2, 1 of 256^2 (at least one).
  for devices, want in ((1, {64: 8, 128: 2, 256: 1}), (2, {64: 8, 128: 4, 256: 2})):
    seen = []
    for batch in pipeline.eval_batches(
      Sizes(sizes), batch_size=8, max_batch_pixels=budget, row_multiple=devices
    ):
      rows, height = batch["image"].shape[:2]
      assert rows == want[height], (devices, height, rows)
      if height < 256:
        assert rows * height * height <= devices * budget
      seen += [s["index"] for s in batch["samples"]]
      assert batch["parts"] == [(0, 1)] * len(batch["samples"])
    assert sorted(seen) == list(range(len(sizes)))
  # Without a budget: batch_size rows for every shape, as before.
  shapes = {b["image"].shape for b in pipeline.eval_batches(Sizes(sizes), batch_size=8)}
  assert shapes == {(8, 64, 64, 3), (8, 128, 128, 3), (8, 256, 256, 3)}


def test_pending_examples_are_bounded_in_bytes():
  """Every image its own size: what waits for a batch never holds more than the byte bound
  (here two 96^2 examples), however many examples max_pending allows."""
  sizes = [(96 + 32 * (i % 3), 96) for i in range(12)]
  reads = []

  class Reads(Sizes):
    def __getitem__(self, index):
      reads.append(index)
      return super().__getitem__(index)

  bound = 2 * 2 * (96 * 96 * 3)  # Each example: its input and its record's image.
  seen = []
  for batch in pipeline.eval_batches(
    Reads(sizes), batch_size=8, max_batch_pixels=1 << 20, max_pending_bytes=bound
  ):
    seen += [s["index"] for s in batch["samples"]]
    waiting = [i for i in reads if i not in seen]
    assert sum(2 * sizes[i][0] * sizes[i][1] * 3 for i in waiting) <= bound
  assert sorted(seen) == list(range(12))


# ---- tiles ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "length,tile,overlap", [(608, 256, 128), (1056, 1024, 128), (6016, 1024, 128), (320, 128, 0)]
)
def test_tile_weights_sum_to_one(length, tile, overlap):
  (starts, weights) = predict._axis(length, tile, overlap, 32)
  assert starts[0] == 0 and starts[-1] + min(tile, length) == length
  assert all(s % 32 == 0 for s in starts)
  assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
  total = np.zeros(length)
  for start, weight in zip(starts, weights):
    total[start : start + len(weight)] += weight
    # The outer quarter of the overlap at an inner edge is never used.
    if start > 0:
      assert not weight[: overlap // 4].any()
    if start + len(weight) < length:
      assert not weight[len(weight) - overlap // 4 :].any()
  np.testing.assert_allclose(total, 1.0, atol=1e-6)


class LocalNet(nn.Module):
  """A stride-4 conv net whose logits see 16 pixels around them at most: inside the quarter
  overlap (32 pixels) of the tiles below, so tiling must not change them."""

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Conv(8, (4, 4), strides=(4, 4), padding="VALID")(x))
    h = nn.relu(nn.Conv(8, (3, 3))(h))
    return {"logits": nn.Conv(2, (3, 3))(h), "image_logits": None}


def _config(**eval_settings):
  return ml_collections.ConfigDict(
    {
      "task": "segmentation",
      "model": {"dtype": "float32"},
      "data": {},
      "eval": {"pad_multiple": 32, "resize": "none", **eval_settings},
    }
  )


def _local_net():
  model = LocalNet()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  # Larger weights than the default init, so the logits vary a lot over the image.
  variables = jax.tree_util.tree_map(lambda v: v * 3.0, variables)
  return model, variables


def _photo(height, width):
  rng = np.random.default_rng(2)
  small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
  image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
  return np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)


def test_tiled_prediction_matches_the_whole_image(monkeypatch):
  """A 600 x 700 image over a 256^2 budget runs as 4 x 5 tiles of 256^2 (overlap 128): the
  probabilities match the untiled run to float rounding. Measured (2-core CPU): max |diff|
  1.2e-7, one float32 ulp at 1.0, with overlap 128 or 64; 0.05 with overlap 32 (its 8-pixel
  unused margin is inside the net's 16-pixel reach) and 1.0 with none. The bound 1e-5 is 100x
  the rounding and 5000x below the smallest seam."""
  model, variables = _local_net()
  image = _photo(600, 700)
  sample = {"image": image, "id": "x", "is_jpeg": False}
  whole = predict.Predictor(model, variables, _config(max_batch_pixels=1 << 20))
  ((_, want),) = list(whole.predict([sample]))
  grids = []
  real_grid = predict.tile_grid
  monkeypatch.setattr(predict, "tile_grid", lambda *a: grids.append(real_grid(*a)) or grids[-1])
  tiled = predict.Predictor(
    model, variables, _config(max_batch_pixels=256 * 256, tile_size=256, tile_overlap=128)
  )
  ((_, got),) = list(tiled.predict([sample]))
  assert len(grids) == 1 and len(grids[0]) == 20  # 608 x 704 -> 4 x 5 tiles.
  assert got["prob"].shape == want["prob"].shape == (600, 700)
  assert got["prob"].dtype == np.float32
  assert np.abs(got["prob"] - want["prob"]).max() < 1e-5
  assert np.isnan(got["image_score"])
  # The test can fail: without an overlap the tile borders show.
  seams = predict.Predictor(
    model, variables, _config(max_batch_pixels=256 * 256, tile_size=256, tile_overlap=0)
  )
  ((_, seamed),) = list(seams.predict([sample]))
  assert np.abs(seamed["prob"] - want["prob"]).max() > 0.05


def test_tiles_of_a_batch_share_one_shape_and_the_budget():
  model, variables = _local_net()
  predictor = predict.Predictor(
    model,
    variables,
    _config(max_batch_pixels=2 * 256 * 256, tile_size=256, tile_overlap=64, batch_size=8),
    batch_size=8,
  )
  shapes = []
  infer = predictor._infer
  predictor._infer = lambda v, inputs: shapes.append(inputs["image"].shape) or infer(v, inputs)
  samples = [
    {"image": _photo(900, 500), "id": "big", "is_jpeg": False},
    {"image": _photo(64, 96), "id": "small", "is_jpeg": False},
  ]
  out = {s["id"]: p["prob"].shape for s, p in predictor.predict(samples)}
  assert out == {"big": (900, 500), "small": (64, 96)}
  # 928 x 512 -> 5 x 3 tiles of 256^2, two per batch (the last half full); the small image
  # alone in a batch of 8 rows (8 x 6144 pixels fit the budget).
  assert shapes == [(2, 256, 256, 3)] * 8 + [(8, 64, 96, 3)]


def test_downscale_fits_the_budget():
  model, variables = _local_net()
  predictor = predict.Predictor(
    model, variables, _config(max_batch_pixels=256 * 256, tile_size=256, large_image="downscale")
  )
  shapes = []
  infer = predictor._infer
  predictor._infer = lambda v, inputs: shapes.append(inputs["image"].shape) or infer(v, inputs)
  ((_, prediction),) = list(predictor.predict([{"image": _photo(600, 700), "id": "x"}]))
  assert prediction["prob"].shape == (600, 700)
  ((rows, height, width, _),) = shapes
  assert rows == 1 and height * width <= 256 * 256 and height >= 192 and width >= 224
  assert base.fit_pixels((600, 700), 32, 256 * 256) == (
    size := base.fit_pixels((600, 700), 32, 1 << 16)
  )
  assert -(-size[0] // 32) * 32 * (-(-size[1] // 32) * 32) <= 1 << 16


def test_finish_sigmoid_is_bit_identical():
  logit = np.random.default_rng(3).normal(0, 6, (50, 70)).astype(np.float32)
  task = base.DenseTask.__new__(base.DenseTask)
  got = task.finish(
    {"logit": logit, "image_score": 0.5}, {"resized_hw": (50, 70), "original_hw": (50, 70)}
  )
  want = (1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
  assert got["prob"].tobytes() == want.tobytes()
  assert np.array_equal(logit, np.random.default_rng(3).normal(0, 6, (50, 70)).astype(np.float32))


def test_eval_settings_are_checked():
  def check(**settings):
    section = {
      "batch_size": 1,
      "threshold_policy": "fixed",
      "threshold": 0.5,
      "num_pictures": 0,
      **settings,
    }
    return config_lib.settings_from_config(config_lib.EvalConfig, section, "eval")

  assert check().resize == "miml"  # The MIML protocol unless a config says otherwise.
  assert check().max_batch_pixels == 2**22 and check().large_image == "tile"
  for settings, message in (
    ({"max_batch_pixels": 1000}, r"eval.max_batch_pixels: expected >= 65536, got 1000"),
    ({"tile_size": 4096}, r"eval.tile_size: a 4096\^2 tile is over eval.max_batch_pixels"),
    ({"tile_size": 1000}, r"eval.tile_size: expected a multiple of 32"),
    ({"tile_overlap": 640}, r"eval.tile_overlap: expected at most half"),
    ({"large_image": "crop"}, r"eval.large_image: expected one of 'tile', 'downscale'"),
  ):
    with pytest.raises(UserInputError, match=message):
      check(**settings)


# ---- eval and predict on 12 and 48 megapixel images --------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny quickstart model trained for 2 steps (its config: the quickstart's eval section)."""
  workdir = tmp_path_factory.mktemp("large") / "w"
  code = cli.main(
    [
      "train",
      "--config",
      QUICKSTART,
      "--workdir",
      str(workdir),
      "--json",
      *TINY,
      "--config.train.steps=2",
    ]
  )
  assert code == 0
  return workdir


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("big")
  write_sample(root, "twelve", 4000, 3000)
  write_sample(root, "fortyeight", 8000, 6000)
  return root


# Peak RSS of `miml-jax eval` with default settings on the 12 + 48 MP folder, in a fresh
# process (2-core CPU, 2 virtual devices): measured 3.4 GB. Of it ~0.3 GB is the process with
# JAX and the model, ~1.1 GB reading and predicting (the 48 MP image and mask decoded, its
# float32 map at full size), the rest scoring that map (evaluate.py, metrics.py). Before, the
# same eval asked XLA for 52 GB (8 copies of the 48 MP image in one batch); with batch_size=1
# it died of std::bad_alloc under a 12 GB cap. The bound leaves 1 GB of room, and is far below
# what one untiled, unbudgeted 48 MP batch needs.
MAX_RSS_GB = 4.5

_MEASURE = textwrap.dedent(
  """
  import json, sys
  from miml_jax import cli
  code = cli.main(sys.argv[1:])
  peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
  print("PEAK_KB", peak, "CODE", code, file=sys.stderr)
  """
)


def test_eval_default_settings_on_12_and_48_megapixels(checkpoint, big_folder, tmp_path):
  config = json.loads((checkpoint / "config.json").read_text())
  assert config["eval"]["resize"] == "miml"
  result = subprocess.run(
    [
      sys.executable,
      "-c",
      _MEASURE,
      "eval",
      "--checkpoint",
      str(checkpoint),
      "--data",
      f"folder:{big_folder}",
      "--json",
    ],
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert "PEAK_KB" in result.stderr, result.stderr[-3000:]
  peak_gb = int(result.stderr.split("PEAK_KB")[1].split()[0]) / 2**20
  print(f"peak RSS {peak_gb:.2f} GB")
  assert result.returncode == 0 and "CODE 0" in result.stderr, result.stderr[-3000:]
  output = json.loads(result.stdout)
  assert output["resize"] == "miml" and output["summary"]["num_images"] == 2
  assert peak_gb < MAX_RSS_GB, peak_gb


def test_bomb_in_a_folder_ends_eval_with_one_line(checkpoint, tmp_path, capsys):
  write_sample(tmp_path, "ok", 64, 48)
  zeros = bytes(20000)
  write_png(tmp_path / "imgs" / "zbomb.png", 20000, 20000, lambda y: zeros, channels=1)
  write_png(tmp_path / "masks" / "zbomb.png", 64, 48, lambda y: bytes(64), channels=1)
  code = cli.main(["eval", "--checkpoint", str(checkpoint), "--data", f"folder:{tmp_path}"])
  _, err = capsys.readouterr()
  assert code == cli.EXIT_USER_ERROR, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "zbomb.png: 20000x20000 is 400,000,000 pixels" in lines[0], err
  assert "--config.data.max_image_pixels=N" in lines[0]
  # The limit is the config's: lowered, it refuses the small image too.
  code = cli.main(
    [
      "eval",
      "--checkpoint",
      str(checkpoint),
      "--data",
      f"folder:{tmp_path}",
      "--config.data.max_image_pixels=3000",
    ]
  )
  _, err = capsys.readouterr()
  assert code == cli.EXIT_USER_ERROR and "ok.png: 64x48 is 3,072 pixels" in err, err


def test_predict_on_12_megapixels(checkpoint, big_folder, tmp_path, capsys):
  out = tmp_path / "out"
  image = big_folder / "imgs" / "twelve.png"
  code = cli.main(
    ["predict", str(image), "--checkpoint", str(checkpoint), "--out", str(out), "--json"]
  )
  stdout, err = capsys.readouterr()
  assert code == 0, err
  (record,) = json.loads(stdout)["predictions"]
  assert (record["width"], record["height"]) == (4000, 3000)
  assert io.header_size(record["files"]["mask"], "mask") == (4000, 3000)


def test_eval_without_resize_tiles_a_large_image(checkpoint, tmp_path, capsys):
  """--resize none: a 2200 x 2000 image (4.4 MP padded, over the 2**22 budget) runs as 3 x 3
  tiles of 1024^2 and is scored at its own size."""
  write_sample(tmp_path, "big", 2200, 2000)
  code = cli.main(
    [
      "eval",
      "--checkpoint",
      str(checkpoint),
      "--data",
      f"folder:{tmp_path}",
      "--resize",
      "none",
      "--json",
    ]
  )
  stdout, err = capsys.readouterr()
  assert code == 0, err
  result = json.loads(stdout)
  assert result["resize"] == "none" and result["summary"]["num_images"] == 1
