"""Tests for miml_jax.qes: the formula, its properties, batching, padding and file input."""

import glob
import os

import cv2
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import numpy as np
import pytest

from miml_jax import qes as qes_lib
from miml_jax.errors import UserInputError

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def reference_qes(p, valid=None):
  """The official formula, written out in NumPy: count(p > 15/16) / (count(p > 1/16) + 1e-8)."""
  p = np.asarray(p, np.float64)
  if valid is not None:
    p = p[np.asarray(valid, bool)]
  return np.count_nonzero(p > 15 / 16) / (np.count_nonzero(p > 1 / 16) + 1e-8)


def random_soft_mask(rng, shape):
  # Beta(0.3, 0.3) puts most mass near 0 and 1 with a spread in between, like a model's output.
  return rng.beta(0.3, 0.3, size=shape).astype(np.float32)


# Small float32 masks in [0, 1], with the threshold values themselves thrown in so that `>` vs
# `>=` mistakes show up.
_EDGE_VALUES = [0.0, 1 / 16, 15 / 16, 1.0, 0.5]
soft_masks = hnp.arrays(
  np.float32,
  hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
  elements=st.one_of(st.floats(0, 1, width=32), st.sampled_from(_EDGE_VALUES)),
)


def test_matches_reference_on_random_soft_masks():
  rng = np.random.default_rng(0)
  for shape in [(17, 23), (64, 64), (5, 200)]:
    p = random_soft_mask(rng, shape)
    assert float(qes_lib.qes(p)) == pytest.approx(reference_qes(p), rel=1e-6)


def test_thresholds_are_strict():
  # 1/16 is outside the region and 15/16 inside it but not confident: the region is
  # {15/16, 1.0, 0.5}, of which only 1.0 is confident.
  p = np.array([[15 / 16, 1 / 16, 1.0, 0.5]], np.float32)
  assert float(qes_lib.qes(p)) == pytest.approx(1 / 3, rel=1e-6)


def test_empty_mask_scores_zero():
  assert float(qes_lib.qes(np.zeros((8, 8), np.float32))) == 0.0
  # Everything at or below 1/16 is outside the predicted region.
  assert float(qes_lib.qes(np.full((8, 8), 1 / 16, np.float32))) == 0.0


def test_binary_mask_scores_one():
  # Why QES needs soft masks: any non-empty binary mask is "fully confident".
  p = np.zeros((16, 16), np.float32)
  p[3:5, 7:9] = 1.0
  assert float(qes_lib.qes(p)) == 1.0


def test_custom_thresholds_and_parameter_checks():
  p = np.array([[0.2, 0.6, 0.95]], np.float32)
  assert float(qes_lib.qes(p, low=0.5, high=0.9)) == pytest.approx(0.5, rel=1e-6)
  with pytest.raises(ValueError):
    qes_lib.qes(p, low=0.9, high=0.5)
  with pytest.raises(ValueError):
    qes_lib.qes(p, eps=0.0)


def test_bad_values_give_nan_unless_in_padding():
  p = np.full((4, 4), 0.99, np.float32)
  for bad in (np.nan, np.inf, 1.5, -0.1):
    q = p.copy()
    q[0, 0] = bad
    assert np.isnan(float(qes_lib.qes(q)))
    valid = np.ones((4, 4), bool)
    valid[0, 0] = False
    assert float(qes_lib.qes(q, valid)) == 1.0
  # An unscaled 0..255 mask is flagged, not read as "all confident".
  assert np.isnan(float(qes_lib.qes(np.full((4, 4), 255, np.uint8))))


@settings(max_examples=40, deadline=None)
@given(soft_masks)
def test_value_in_unit_interval(p):
  value = float(qes_lib.qes(p))
  assert 0.0 <= value <= 1.0
  assert value == pytest.approx(reference_qes(p), rel=1e-6, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(soft_masks)
def test_numpy_version_equals_the_jitted_one(p):
  """qes_numpy (the dataset builders' Beam workers) gives qes's float32 score exactly."""
  assert qes_lib.qes_numpy(p) == float(qes_lib.qes(p))


def test_numpy_version_flags_bad_values():
  assert np.isnan(qes_lib.qes_numpy(np.full((4, 4), 255, np.uint8)))


@settings(max_examples=25, deadline=None)
@given(
  soft_masks,
  st.integers(0, 3),
  st.integers(0, 3),
  st.integers(0, 3),
  st.integers(0, 3),
  st.floats(0, 1, width=32),
)
def test_padding_invariance(p, top, bottom, left, right, fill):
  base = float(qes_lib.qes(p))
  pad = ((top, bottom), (left, right))
  # Zeros are below `low`, so zero padding changes nothing even without a valid mask.
  assert float(qes_lib.qes(np.pad(p, pad))) == base
  valid = np.pad(np.ones(p.shape, bool), pad)
  assert float(qes_lib.qes(np.pad(p, pad), valid)) == base
  # With `valid`, padding is ignored whatever its value.
  assert float(qes_lib.qes(np.pad(p, pad, constant_values=fill), valid)) == base


@settings(max_examples=40, deadline=None)
@given(soft_masks, st.data())
def test_monotone_in_confidence(p, data):
  i = data.draw(st.integers(0, p.shape[0] - 1))
  j = data.draw(st.integers(0, p.shape[1] - 1))
  for start in (0.5, 0.0):  # mid-range, then below `low`
    before = p.copy()
    before[i, j] = start
    after = p.copy()
    after[i, j] = 0.97
    assert float(qes_lib.qes(after)) >= float(qes_lib.qes(before))


@settings(max_examples=10, deadline=None)
@given(st.lists(soft_masks, min_size=1, max_size=4))
def test_batch_equals_per_item(masks):
  probs, valid = qes_lib.pad_to_batch(masks, multiple=4)
  batch = np.asarray(qes_lib.qes_batch(probs, valid))
  singles = np.array([float(qes_lib.qes(m)) for m in masks])
  np.testing.assert_array_equal(batch, singles)
  # Without `valid`, zero padding still gives the same scores.
  np.testing.assert_array_equal(np.asarray(qes_lib.qes_batch(probs)), singles)


def test_batch_does_not_retrace():
  rng = np.random.default_rng(1)
  probs = random_soft_mask(rng, (3, 8, 8))
  valid = np.ones(probs.shape, bool)
  cache_size = getattr(qes_lib._qes_batch, "_cache_size", None)
  if cache_size is None:
    pytest.skip("this jax version does not expose the jit cache size")
  qes_lib.qes_batch(probs, valid, low=0.1)
  before = cache_size()
  for _ in range(3):
    qes_lib.qes_batch(random_soft_mask(rng, (3, 8, 8)), valid, low=0.1)
  qes_lib.qes_batch(probs, valid, low=np.float64(0.1))
  assert cache_size() == before


def test_pad_to_batch_shapes():
  masks = [np.full((5, 40), 0.7, np.float32), np.full((33, 3), 0.2, np.float32)]
  probs, valid = qes_lib.pad_to_batch(masks, batch_size=4)
  assert probs.shape == valid.shape == (4, 64, 64)
  assert probs.dtype == np.float32 and valid.dtype == bool
  assert valid[0].sum() == 200 and valid[0, :5, :40].all()
  assert valid[1].sum() == 99 and valid[1, :33, :3].all()
  assert not valid[2:].any() and not probs[2:].any()
  assert probs[0, :5, :40].min() == pytest.approx(0.7) and probs[0, 5:].max() == 0.0
  np.testing.assert_array_equal(np.asarray(qes_lib.qes_batch(probs, valid))[2:], [0.0, 0.0])
  assert qes_lib.pad_to_batch(masks, multiple=1)[0].shape == (2, 33, 40)
  with pytest.raises(ValueError):
    qes_lib.pad_to_batch(masks, batch_size=1)
  with pytest.raises(ValueError):
    qes_lib.pad_to_batch([np.zeros((2, 2, 3))])


def _write_png(path, array):
  assert cv2.imwrite(str(path), array)
  return str(path)


def test_qes_files_8_and_16_bit(tmp_path):
  rng = np.random.default_rng(2)
  paths, expected = [], []
  # Five files of different sizes with batch_size=2: the last chunk is padded to a full batch.
  for index, shape in enumerate([(20, 30), (31, 9), (50, 50), (7, 70), (12, 12)]):
    p = random_soft_mask(rng, shape)
    if index % 2:
      array = np.round(p * 65535).astype(np.uint16)
      expected.append(reference_qes(array.astype(np.float32) / 65535))
    else:
      array = np.round(p * 255).astype(np.uint8)
      expected.append(reference_qes(array.astype(np.float32) / 255))
    paths.append(_write_png(tmp_path / f"m{index}.png", array))
  scores = qes_lib.qes_files(paths, batch_size=2)
  assert all(type(s) is float for s in scores)
  np.testing.assert_allclose(scores, expected, rtol=1e-6)
  assert qes_lib.qes_files([]) == []


def test_qes_files_binary_mask_scores_one(tmp_path):
  mask = np.zeros((16, 16), np.uint8)
  mask[4:9, 2:6] = 255
  empty = np.zeros((16, 16), np.uint8)
  paths = [_write_png(tmp_path / "bin.png", mask), _write_png(tmp_path / "empty.png", empty)]
  assert qes_lib.qes_files(paths) == [1.0, 0.0]


def test_qes_files_errors_name_the_file(tmp_path, monkeypatch):
  good = _write_png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
  broken = tmp_path / "broken.png"
  broken.write_bytes(b"not a png at all")
  with pytest.raises(UserInputError, match="broken.png"):
    qes_lib.qes_files([good, str(broken)])
  with pytest.raises(UserInputError, match="missing.png"):
    qes_lib.qes_files([str(tmp_path / "missing.png")])
  # A float TIFF is scaled like an 8-bit file and can end up outside [0, 1].
  tiff = str(tmp_path / "float.tiff")
  assert cv2.imwrite(tiff, np.full((4, 4), 300.0, np.float32))
  with pytest.raises(UserInputError, match="float.tiff"):
    qes_lib.qes_files([tiff])
  # OpenCV will not write a 2-channel image, so fake a decoder returning one.
  monkeypatch.setattr(qes_lib.io, "read_soft_mask", lambda path: np.zeros((4, 4, 2), np.float32))
  with pytest.raises(UserInputError, match="good.png"):
    qes_lib.qes_files([good])


def test_real_masks_qes_falls_with_blur(tmp_path):
  mask_paths = sorted(glob.glob(os.path.join(SHARED_DATA, "casia1_samples", "masks", "*.png")))
  if not mask_paths:
    pytest.skip(f"{SHARED_DATA}/casia1_samples/masks is absent")
  masks = [cv2.imread(p, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255 for p in mask_paths]
  sigmas = [1, 2, 4, 8]
  per_sigma = []
  for sigma in sigmas:
    blurred = [cv2.GaussianBlur(m, (0, 0), sigma) for m in masks]
    probs, valid = qes_lib.pad_to_batch(blurred)
    per_sigma.append(np.asarray(qes_lib.qes_batch(probs, valid)))
  per_sigma = np.array(per_sigma)
  # The binary originals are uninformative (1.0); blurring makes the region less confident.
  assert qes_lib.qes_files(mask_paths[:4]) == [1.0] * 4
  assert (np.diff(per_sigma.mean(axis=1)) < 0).all()
  assert (np.diff(per_sigma, axis=0) <= 1e-7).all()
  # Kept at the official SDG cut-off (QES > 0.5): nearly all masks sharp, nearly none blurred.
  assert (per_sigma[0] > 0.5).mean() > 0.9
  assert (per_sigma[-1] > 0.5).mean() < 0.1
  # Same scores through PNG files, up to 8-bit quantisation of the blurred masks.
  paths = [
    _write_png(
      tmp_path / f"{i}.png", np.round(cv2.GaussianBlur(m, (0, 0), 2) * 255).astype(np.uint8)
    )
    for i, m in enumerate(masks[:6])
  ]
  np.testing.assert_allclose(qes_lib.qes_files(paths, batch_size=4), per_sigma[1, :6], atol=0.02)
