"""The JPEG-domain view (miml_jax/models/jpeg.py) against OpenCV's DCT and JPEG codec."""

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miml_jax import models
from miml_jax.errors import UserInputError
from miml_jax.input import transforms
from miml_jax.models import jpeg
from test_models import _tiny_config

# The IJG luma table (JPEG standard, Annex K), row-major.
LUMA_TABLE = np.array(
  [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
  ]
).reshape(-1)


def _ijg_steps(quality: int) -> np.ndarray:
  """libjpeg's table scaling for a quality setting (jcparam.c)."""
  scale = 5000 // quality if quality < 50 else 200 - 2 * quality
  return np.clip((LUMA_TABLE * scale + 50) // 100, 1, 255)


def _photo_like(seed: int, size: int = 256) -> np.ndarray:
  """Smooth shapes, edges and fine texture: coefficients spread over many levels, as a photo's."""
  rng = np.random.default_rng(seed)
  image = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 6)
  image = (image - image.min()) / np.ptp(image) * 180 + 30
  for _ in range(12):
    centre = tuple(int(v) for v in rng.integers(0, size, 2))
    colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
    cv2.circle(image, centre, int(rng.integers(8, 60)), colour, -1)
  image += rng.normal(0, 6, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
  ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  assert ok
  return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1]


def _normalised(rgb: np.ndarray, dtype=jnp.float32) -> jax.Array:
  return transforms.normalize(jnp.asarray(rgb[None]), dtype)


def test_zigzag_is_jpegs_order():
  # JPEG's zig-zag (Annex A, Figure A.6), first 15 positions and the last.
  assert list(jpeg.ZIGZAG[:15]) == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4]
  assert jpeg.ZIGZAG[-1] == 63 and sorted(jpeg.ZIGZAG) == list(range(64))


def test_block_dct_matches_opencv_per_block():
  rgb = np.random.default_rng(0).uniform(0, 255, (2, 16, 24, 3)).astype(np.float32)
  got = np.asarray(jpeg.block_dct(jnp.asarray(rgb)))
  assert got.shape == (2, 2, 3, 64)
  luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32) - 128
  for b in range(2):
    for i in range(2):
      for j in range(3):
        want = cv2.dct(luma[b, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]).reshape(-1)[jpeg.ZIGZAG]
        np.testing.assert_allclose(got[b, i, j], want, atol=1e-3)


@pytest.mark.parametrize("quality", [60, 75, 90])
def test_steps_of_a_decoded_jpeg_are_its_table(quality):
  rgb = _jpeg(_photo_like(quality), quality)
  coefficients = jpeg.block_dct(jpeg.pixels(_normalised(rgb)))[..., 1:11]
  steps = np.asarray(jpeg.quantisation_steps(coefficients, 32, 0.2, 16))[0]
  np.testing.assert_array_equal(steps, _ijg_steps(quality)[jpeg.ZIGZAG[1:11]])


def test_an_uncompressed_image_has_no_step_and_bfloat16_changes_nothing():
  rgb = _photo_like(1)
  coefficients = jpeg.block_dct(jpeg.pixels(_normalised(rgb)))[..., 1:16]
  np.testing.assert_array_equal(np.asarray(jpeg.quantisation_steps(coefficients, 32, 0.2, 16)), 1)
  # Integer pixels come back exactly from a bfloat16 normalised input, so the view is the same.
  compressed = _jpeg(rgb, 80)
  np.testing.assert_array_equal(
    np.asarray(jpeg.pixels(_normalised(compressed, jnp.bfloat16)))[0], compressed
  )


def test_double_compression_leaves_empty_histogram_bins():
  # Quantised at step q1 then q2 < q1, the levels k = c / q2 can only be near multiples of
  # q1 / q2: some levels never occur. Single compression at q2 fills every level.
  cfg = jpeg.DCTViewConfig(frequencies=3, window=1)
  single = _jpeg(_photo_like(2), 90)
  double = _jpeg(_jpeg(_photo_like(2), 50), 90)
  histograms = []
  for rgb in (single, double):
    features = np.asarray(jpeg.histogram_features(jpeg.pixels(_normalised(rgb)), cfg))[0]
    histograms.append(features[..., : 3 * (cfg.clip + 1)].reshape(-1, 3, cfg.clip + 1).sum(0))
  empty_single = (histograms[0][:, 1:8] == 0).sum()
  empty_double = (histograms[1][:, 1:8] == 0).sum()
  assert empty_single == 0 and empty_double >= 6, (histograms, empty_single, empty_double)


def test_web_iml_dct_view_joins_the_stem_and_is_checked():
  cfg = _tiny_config().to_dict()
  cfg.update(trace_stem=(6,), dct_view={"frequencies": 4, "clip": 3, "width": 5})
  model = models.build_model(cfg)
  x = _normalised(_jpeg(_photo_like(3, 64), 75))
  variables = model.init({"params": jax.random.key(0)}, x, train=False)
  params = variables["params"]
  # 4 frequencies x 4 levels + 4 steps into a 5-wide projection; trace stem 6 + view 5 into
  # the backbone's stem.
  assert params["dct_view"]["proj"]["kernel"].shape == (20, 5)
  assert params["backbone"]["downsample_layers_0_0"]["kernel"].shape == (4, 4, 11, 8)
  out = model.apply(variables, x, train=False)
  assert out["logits"].shape == (1, 16, 16, 2) and np.isfinite(np.asarray(out["logits"])).all()
  # The image-wide histograms' detector adds its logits to the image head's.
  cfg["dct_view"]["image_head"] = 7
  variables = models.build_model(cfg).init({"params": jax.random.key(0)}, x, train=False)
  detector = variables["params"]["dct_detector"]
  assert detector["hidden"]["kernel"].shape == (20, 7) and detector["out"]["kernel"].shape == (7, 2)
  without = {**variables["params"], "dct_detector": jax.tree.map(jnp.zeros_like, detector)}
  shifted = models.build_model(cfg).apply(variables, x, train=False)["image_logits"]
  plain = models.build_model(cfg).apply({**variables, "params": without}, x, train=False)
  assert not np.allclose(shifted, plain["image_logits"])
  with pytest.raises(UserInputError, match="needs the image head"):
    models.build_model({**cfg, "head": {**cfg["head"], "image_head": False}})
  with pytest.raises(UserInputError, match=r"model\.dct_view\.bins"):
    models.build_model({**cfg, "dct_view": {"bins": 4}})
  with pytest.raises(UserInputError, match=r"model\.dct_view\.frequencies"):
    models.build_model({**cfg, "dct_view": {"frequencies": 0}})
