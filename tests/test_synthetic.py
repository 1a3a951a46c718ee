"""The embedded synthetic forgery set: determinism, format, errors, export, and whether the data
is both hard for trivial predictors and carries learnable (noise) traces."""

import hashlib
import os
import pickle
import subprocess
import sys

import cv2
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input import synthetic

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_sample(a, b):
  assert a["id"] == b["id"] and a["kind"] == b["kind"]
  assert a["image"].tobytes() == b["image"].tobytes()
  assert a["mask"].tobytes() == b["mask"].tobytes()


def iou(prediction, mask):
  union = np.count_nonzero(prediction | mask)
  return np.count_nonzero(prediction & mask) / union if union else 1.0


def local_noise(image):
  """Local noise level: std of (grey - 3x3 median) in 8x8 windows."""
  grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
  residual = grey.astype(np.float32) - cv2.medianBlur(grey, 3).astype(np.float32)
  return np.sqrt(cv2.blur(residual * residual, (8, 8)))


def noise_log_ratio(noise, mask):
  """log of the mean local noise well inside `mask` over that well outside it (None if the
  inside is too thin to measure)."""
  kernel = np.ones((9, 9), np.uint8)
  inside = cv2.erode(mask, kernel).astype(bool)
  outside = ~cv2.dilate(mask, kernel).astype(bool)
  if np.count_nonzero(inside) < 16 or np.count_nonzero(outside) < 16:
    return None
  return np.log((noise[inside].mean() + 0.1) / (noise[outside].mean() + 0.1))


@pytest.fixture(scope="module")
def validation():
  """The whole default validation split at 128x128, generated once."""
  data = synthetic.SyntheticForgeries("validation")
  return [data[i] for i in range(len(data))]


def test_default_sizes_and_lengths():
  assert synthetic.DEFAULT_NUM_EXAMPLES == {"train": 4096, "validation": 128}
  assert len(synthetic.SyntheticForgeries()) == 4096
  assert len(synthetic.SyntheticForgeries("validation")) == 128
  assert len(synthetic.SyntheticForgeries("train", num_examples=7)) == 7


def test_same_index_same_bytes_in_any_instance_and_order():
  data = synthetic.SyntheticForgeries("train", num_examples=10, seed=3)
  forward = [data[i] for i in range(6)]
  backward = [data[i] for i in reversed(range(6))][::-1]
  fresh = synthetic.SyntheticForgeries("train", num_examples=10, seed=3)
  for i in range(6):
    assert_same_sample(forward[i], backward[i])
    assert_same_sample(forward[i], fresh[i])
  # The number of examples only bounds the index; it does not change the samples.
  assert_same_sample(forward[4], synthetic.SyntheticForgeries("train", seed=3)[4])
  assert_same_sample(data[-1], data[9])
  # grain pickles sources into its worker processes.
  assert_same_sample(pickle.loads(pickle.dumps(data))[2], forward[2])


def test_same_sample_in_a_fresh_process():
  code = (
    "import hashlib; from miml_jax.input import synthetic; "
    "s = synthetic.SyntheticForgeries('validation', image_size=(40, 56), seed=2)[5]; "
    "print(hashlib.sha256(s['image'].tobytes() + s['mask'].tobytes()).hexdigest(), "
    "s['kind'])"
  )
  env = dict(
    os.environ,
    PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    PYTHONHASHSEED="123",
  )
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO_ROOT
  ).stdout.split()
  here = synthetic.SyntheticForgeries("validation", image_size=(40, 56), seed=2)[5]
  digest = hashlib.sha256(here["image"].tobytes() + here["mask"].tobytes()).hexdigest()
  assert out == [digest, here["kind"]]


def test_splits_and_seeds_are_different_streams():
  train = synthetic.SyntheticForgeries("train")
  validation = synthetic.SyntheticForgeries("validation")
  other_seed = synthetic.SyntheticForgeries("train", seed=1)
  for i in range(4):
    assert train[i]["image"].tobytes() != validation[i]["image"].tobytes()
    assert train[i]["image"].tobytes() != other_seed[i]["image"].tobytes()
    assert train[i]["id"] == f"synthetic/train/{i:06d}"
    assert validation[i]["id"] == f"synthetic/validation/{i:06d}"
  # Consecutive samples differ too (no accidental reuse of one seed).
  assert train[0]["image"].tobytes() != train[1]["image"].tobytes()


@pytest.mark.parametrize(
  "image_size, shape", [(128, (128, 128)), ((48, 80), (48, 80)), ((96, 32), (96, 32))]
)
def test_shapes_dtypes_and_values(image_size, shape):
  data = synthetic.SyntheticForgeries("train", num_examples=8, image_size=image_size)
  for i in range(len(data)):
    sample = data[i]
    assert set(sample) == {"image", "mask", "kind", "id"}
    assert sample["image"].dtype == np.uint8 and sample["image"].shape == shape + (3,)
    assert sample["mask"].dtype == np.uint8 and sample["mask"].shape == shape
    assert set(np.unique(sample["mask"])) == {0, 1}
    assert sample["kind"] in synthetic.KINDS
    # A real photo-like image, not a flat or saturated one.
    assert sample["image"].std() > 3 and 10 < sample["image"].mean() < 245


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(
  height=st.integers(32, 100),
  width=st.integers(32, 100),
  index=st.integers(0, 4095),
  seed=st.integers(0, 2**32),
)
def test_any_size_gives_a_valid_sample(height, width, index, seed):
  sample = synthetic.SyntheticForgeries(image_size=(height, width), seed=seed)[index]
  assert sample["image"].shape == (height, width, 3)
  fraction = sample["mask"].mean()
  assert synthetic.MIN_TAMPERED_FRACTION <= fraction <= synthetic.MAX_TAMPERED_FRACTION


@pytest.mark.parametrize(
  "kwargs, message",
  [
    ({"split": "test"}, "unknown synthetic split"),
    ({"image_size": 31}, ">= 32"),
    ({"image_size": (64, 16)}, ">= 32"),
    ({"image_size": (64, 64, 3)}, "expected an int or (height, width)"),
    ({"image_size": 64.0}, "expected an int or (height, width)"),
    ({"num_examples": 0}, "positive int"),
    ({"seed": -1}, "non-negative int"),
  ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
  with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
    synthetic.SyntheticForgeries(**kwargs)


def test_index_out_of_range():
  data = synthetic.SyntheticForgeries("validation", num_examples=3)
  for index in (3, 100, -4):
    with pytest.raises(IndexError):
      data[index]  # pylint: disable=pointless-statement
  with pytest.raises(TypeError):
    data[1.0]  # pylint: disable=pointless-statement
  # Iteration stops at the end, as for a sequence.
  assert len(list(data)) == 3


def test_grain_map_dataset_source():
  grain = pytest.importorskip("grain")
  data = synthetic.SyntheticForgeries("validation", num_examples=4, image_size=40)
  dataset = grain.MapDataset.source(data)
  assert len(dataset) == 4
  assert_same_sample(dataset[2], data[2])


def test_tampered_fraction_bounds():
  data = synthetic.SyntheticForgeries("train", num_examples=64)
  fractions = np.array([data[i]["mask"].mean() for i in range(len(data))])
  assert fractions.min() >= synthetic.MIN_TAMPERED_FRACTION
  assert fractions.max() <= synthetic.MAX_TAMPERED_FRACTION
  assert 0.08 <= fractions.mean() <= 0.18
  # Small and large regions both occur.
  assert fractions.min() < 0.06 and fractions.max() > 0.2


def test_all_kinds_occur(validation):
  counts = {kind: sum(s["kind"] == kind for s in validation) for kind in synthetic.KINDS}
  assert all(count >= 20 for count in counts.values()), counts


def test_trivial_predictors_score_poorly(validation):
  masks = [s["mask"].astype(bool) for s in validation]
  all_one = np.mean([iou(np.ones_like(m), m) for m in masks])
  all_zero = np.mean([iou(np.zeros_like(m), m) for m in masks])
  assert all_zero == 0.0
  assert 0.08 < all_one < 0.25


def test_colour_threshold_oracle_scores_poorly(validation):
  """The best single grey-level threshold per image (either polarity), chosen with the mask.

  It is judged per kind too: a splice donor of a different colour family would lift the splices
  to about 0.4 while the overall mean stayed under 0.35.
  """
  scores = {}
  for sample in validation:
    grey = cv2.cvtColor(sample["image"], cv2.COLOR_RGB2GRAY).ravel()
    mask = sample["mask"].ravel().astype(bool)
    tampered = np.bincount(grey[mask], minlength=256)
    pristine = np.bincount(grey[~mask], minlength=256)
    best = 0.0
    # Predicting grey >= t, then grey <= t: IoU = TP / (|mask| + FP).
    for tp, fp in (
      (np.cumsum(tampered[::-1]), np.cumsum(pristine[::-1])),
      (np.cumsum(tampered), np.cumsum(pristine)),
    ):
      best = max(best, float(np.max(tp / (mask.sum() + fp))))
    scores.setdefault(sample["kind"], []).append(best)
  assert np.mean(sum(scores.values(), [])) < 0.35
  for kind, kind_scores in scores.items():
    assert np.mean(kind_scores) < 0.3, (kind, np.mean(kind_scores))


def test_noise_traces_mark_the_manipulated_region(validation):
  """The local noise level differs between the manipulated region and the rest far more than
  between a decoy region (the mask rotated by 180 degrees) and the rest.

  Scene content (edges, textures) alone makes a decoy region differ by about 0.3 in |log|; the
  manipulation must stand out clearly above that, or there is nothing for a model to learn.
  """
  true_ratios, decoy_ratios = {}, {}
  for sample in validation:
    noise = local_noise(sample["image"])
    true_ratio = noise_log_ratio(noise, sample["mask"])
    decoy_ratio = noise_log_ratio(noise, np.ascontiguousarray(sample["mask"][::-1, ::-1]))
    if true_ratio is not None and decoy_ratio is not None:
      true_ratios.setdefault(sample["kind"], []).append(true_ratio)
      decoy_ratios.setdefault(sample["kind"], []).append(decoy_ratio)
  for kind in ("splice", "local_edit"):
    # Either direction (a noisier or a smoother region) is a trace.
    true_mean = np.mean(np.abs(true_ratios[kind]))
    decoy_mean = np.mean(np.abs(decoy_ratios[kind]))
    assert true_mean > 0.5 and true_mean > 1.7 * decoy_mean, (kind, true_mean, decoy_mean)
  # Copy-move leaves a fainter trace with a direction: most copies are resampled, and
  # interpolation smooths their noise.
  true_mean, decoy_mean = np.mean(true_ratios["copy_move"]), np.mean(decoy_ratios["copy_move"])
  assert true_mean < decoy_mean - 0.2, (true_mean, decoy_mean)


def test_export_folder_writes_the_miml_layout(tmp_path):
  data = synthetic.SyntheticForgeries("validation", num_examples=5, image_size=(40, 48))
  out = tmp_path / "export"
  assert synthetic.export_folder(data, str(out), limit=3) == 3
  names = sorted(os.listdir(out / "imgs"))
  assert names == sorted(os.listdir(out / "masks")) == ["000000.png", "000001.png", "000002.png"]
  for k, name in enumerate(names):
    np.testing.assert_array_equal(io.read_image(str(out / "imgs" / name)), data[k]["image"])
    np.testing.assert_array_equal(io.read_mask(str(out / "masks" / name)), data[k]["mask"] * 255)


def test_export_folder_refuses_a_non_empty_target(tmp_path):
  data = synthetic.SyntheticForgeries("validation", num_examples=2, image_size=32)
  out = tmp_path / "user"
  (out / "imgs").mkdir(parents=True)
  (out / "imgs" / "000000.png").write_bytes(b"precious")
  with pytest.raises(UserInputError, match="already contains files"):
    synthetic.export_folder(data, str(out))
  assert (out / "imgs" / "000000.png").read_bytes() == b"precious"
  assert not (out / "masks").exists()
  # A finished export is not overwritten by a second one either.
  assert synthetic.export_folder(data, str(tmp_path / "fresh")) == 2
  with pytest.raises(UserInputError, match="already contains files"):
    synthetic.export_folder(data, str(tmp_path / "fresh"))
  with pytest.raises(UserInputError, match="limit"):
    synthetic.export_folder(data, str(tmp_path / "other"), limit=-1)
