"""Pair sources (miml_jax/input/pairs.py): real pairs from the CAAA layout and from a built
ciml_pairs dataset (identical samples), synthetic SPG pairs from COCO objects (masks that cover
every changed pixel), the pair classifier's self-supervised pairs (labels that match how each
pair was made), determinism, and errors that name the problem."""

import json
import os

import cv2
import ml_collections
import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.errors import UserInputError
from miml_jax.input import coco, pairs, sources
from miml_jax.input.pairs import PairSynthConfig, SPGConfig

# The COCO-format fixture helpers of the splicing tests.
from test_instance_forgery import ellipse, noise, polygon, write_coco

BUILDERS = os.path.join(os.path.dirname(__file__), "..", "datasets")
PAIR_KEYS = {"authentic", "forged", "mask", "has_mask", "id", "is_jpeg"}
CLASSIFIER_KEYS = PAIR_KEYS | {"same_source", "aligned", "box"}


def assert_same_samples(a, b):
  assert sorted(a) == sorted(b)
  for key, value in a.items():
    if isinstance(value, np.ndarray):
      assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
      assert value.tobytes() == b[key].tobytes(), key
    else:
      assert value == b[key] and type(value) is type(b[key]), key


def changes(sample):
  return np.any(sample["authentic"] != sample["forged"], axis=-1)


# ---- pairs: and tfds:ciml_pairs -------------------------------------------------------------


def write_pairs(root):
  """a: same size, JPEG authentic, PNG forged, a grey mask; b: a JPEG forged of another size, no
  mask; c: a PNG pair; plus a file that is not a pair folder."""
  rng = np.random.default_rng(1)
  sizes = {"a": ((20, 30), (20, 30)), "b": ((20, 30), (24, 18)), "c": ((16, 16), (16, 16))}
  extensions = {"a": ("jpg", "png"), "b": ("png", "jpg"), "c": ("png", "png")}
  for pair, (size_0, size_1) in sizes.items():
    (root / pair).mkdir(parents=True)
    ext_0, ext_1 = extensions[pair]
    io.write_image(str(root / pair / f"0.{ext_0}"), rng.integers(0, 256, (*size_0, 3), np.uint8))
    io.write_image(str(root / pair / f"1.{ext_1}"), rng.integers(0, 256, (*size_1, 3), np.uint8))
  mask = np.zeros((20, 30), np.uint8)
  mask[5:15, 10:25] = 255
  mask[5:15, 10] = 100  # A grey level survives.
  io.write_image(str(root / "a" / "mask.png"), mask)
  (root / "README.txt").write_text("not a pair")
  return mask


def test_pair_folder_and_built_ciml_pairs_give_the_same_samples(tmp_path, capsys):
  root = tmp_path / "pairs"
  mask = write_pairs(root)
  source = sources.make_source(f"pairs:{root}", "train")
  assert isinstance(source, pairs.PairFolderSource) and len(source) == 3
  samples = [source[i] for i in range(3)]
  assert [s["id"] for s in samples] == ["a", "b", "c"]
  for sample in samples:
    assert set(sample) == PAIR_KEYS | {"forged_bytes"}
    assert sample["authentic"].dtype == sample["forged"].dtype == np.uint8
    assert sample["mask"].dtype == np.uint8 and sample["mask"].shape == sample["forged"].shape[:2]
  a, b, c = samples
  np.testing.assert_array_equal(a["mask"], mask)
  np.testing.assert_array_equal(a["forged"], io.read_image(str(root / "a" / "1.png")))
  assert a["has_mask"] and not b["has_mask"] and not b["mask"].any()
  assert b["forged"].shape == (24, 18, 3) and b["authentic"].shape == (20, 30, 3)
  assert [s["is_jpeg"] for s in samples] == [False, True, False]  # Of the forged file.
  # The same folder built as datasets/ciml_pairs and read back through tfds:.
  code = cli.main(
    [
      "data",
      "build",
      "ciml_pairs",
      "--manual-dir",
      str(root),
      "--data-dir",
      str(tmp_path / "tfds"),
      "--builders",
      BUILDERS,
    ]
  )
  assert code == 0, capsys.readouterr().err[-2000:]
  built = sources.make_source(f"tfds:{tmp_path / 'tfds'}/ciml_pairs", "train")
  assert isinstance(built, pairs.BuiltPairSource) and len(built) == 3
  by_id = {built[i]["id"]: built[i] for i in range(3)}
  for sample in samples:
    assert_same_samples(by_id[sample["id"]], sample)
  # Pairs mix like any source.
  mixture = sources.make_source(f"pairs:{root}*2+tfds:{tmp_path / 'tfds'}/ciml_pairs", "train")
  assert len(mixture) == 9 and mixture[8]["id"].endswith("ciml_pairs/" + built[2]["id"])


def test_pair_folder_errors_name_the_file(tmp_path):
  root = tmp_path / "pairs"
  write_pairs(root)
  (root / "d").mkdir()
  io.write_image(str(root / "d" / "0.png"), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserInputError, match=r"pairs/d: no 1\.<ext> \(forged image\)"):
    sources.make_source(f"pairs:{root}", "train")
  # data.on_error='skip': the folder is left out, and said so.
  source = sources.make_source(f"pairs:{root}", "train", on_error="skip")
  assert len(source) == 3 and len(source.skipped) == 1 and "pairs/d: no 1." in source.skipped[0]
  io.write_image(str(root / "d" / "0.jpg"), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(UserInputError, match=r"pairs/d: more than one authentic file \(0\.jpg, 0"):
    sources.make_source(f"pairs:{root}", "train")
  os.remove(root / "d" / "0.jpg")
  io.write_image(str(root / "d" / "1.png"), np.zeros((4, 5, 3), np.uint8))
  io.write_image(str(root / "d" / "mask.png"), np.zeros((4, 4), np.uint8))
  source = sources.make_source(f"pairs:{root}", "train")
  with pytest.raises(
    UserInputError,
    match=r"d/mask\.png: mask is 4x4 but its image .*d/1\.png "
    r"is 5x4",
  ):
    source[3]
  (root / "c" / "1.png").write_bytes(b"broken")
  with pytest.raises(UserInputError, match=r"c/1\.png: not a readable image"):
    source[2]
  (tmp_path / "empty").mkdir()
  cases = [
    (f"pairs:{tmp_path / 'empty'}", "no pair folders"),
    (f"pairs:{tmp_path / 'missing'}", "missing: no such directory"),
    ("pairs:", "give a path, pairs:/path/to/root"),
    ("pairz:/x", "unknown kind 'pairz'.*pairs:PATH, coco_spg:PATH, pair_synth:PATH"),
  ]
  for spec, message in cases:
    with pytest.raises(UserInputError, match=message):
      sources.make_source(spec, "train")


@pytest.mark.shared_data
def test_the_shared_web_pairs(shared_data):
  source = sources.make_source(f"pairs:{os.path.join(shared_data, 'web_pairs')}", "train")
  assert len(source) == 71 and not source.skipped
  same_size = 0
  for index in range(len(source)):
    sample = source[index]
    assert (
      set(sample) == PAIR_KEYS | {"forged_bytes"}
      and not sample["has_mask"]
      and not sample["mask"].any()
    )
    assert sample["mask"].shape == sample["forged"].shape[:2]
    same_size += sample["authentic"].shape == sample["forged"].shape
  assert same_size == 25  # As the data's README says.


# ---- coco_spg --------------------------------------------------------------------------------


@pytest.fixture
def coco_root(tmp_path):
  """Three 80x80 noise photos, each with two large objects (a polygon and an RLE ellipse) and a
  tiny one that never qualifies."""
  root = tmp_path / "coco"
  (root / "images").mkdir(parents=True)
  images, annotations = [], []
  for k in range(3):
    io.write_image(str(root / "images" / f"{k}.png"), noise(80, 80, 10 + k))
    images.append({"id": k, "file_name": f"{k}.png", "height": 80, "width": 80})
    blob = ellipse(80, 80, (50 - 4 * k, 52), (16, 12), 20 * k)
    runs = coco.mask_to_runs(blob).tolist()
    for number, segmentation in enumerate(
      [[polygon(6 + 3 * k, 6, 30, 26)], {"size": [80, 80], "counts": runs}, [polygon(70, 2, 4, 4)]]
    ):
      annotations.append(
        {
          "id": 10 * k + number,
          "image_id": k,
          "category_id": 1,
          "iscrowd": 0,
          "segmentation": segmentation,
        }
      )
  write_coco(root, images, annotations)
  return root


def check_spg_sample(sample, size):
  assert set(sample) == PAIR_KEYS | {"kind", "route"}
  assert sample["authentic"].shape == sample["forged"].shape == (size, size, 3)
  assert sample["mask"].shape == (size, size) and set(np.unique(sample["mask"])) <= {0, 255}
  assert sample["has_mask"] and not sample["is_jpeg"]
  mask, changed = sample["mask"] > 0, changes(sample)
  assert not (changed & ~mask).any()  # Every changed pixel is in the mask ...
  if sample["kind"] != "authentic":
    assert mask.sum() >= 256 and (changed & mask).sum() >= 0.5 * mask.sum()  # ... and is mostly so.


def test_coco_spg_masks_cover_the_edits(coco_root):
  seen = {}
  for weights in ((1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 1)):
    for seed in range(3):
      source = sources.make_source(
        f"coco_spg:{coco_root}", "train", image_size=64, seed=seed, spg={"weights": weights}
      )
      assert isinstance(source, pairs.SPGSource) and len(source) == 3
      for index in range(3):
        sample = source[index]
        check_spg_sample(sample, 64)
        assert sample["id"] == f"{index}.png"
        seen.setdefault(sample["kind"], []).append(sample)
      assert source.fallback_count == 0
  assert sorted(seen) == ["recolour", "remove", "replace"]
  for sample in seen["recolour"]:
    # Recolouring keeps the object's silhouette: the mask is an object of the crop.
    assert sample["mask"].sum() // 255 < 64 * 64 // 2
  for sample in seen["remove"]:
    # The dilated object, inpainted: smoother than the noise it replaces.
    mask = sample["mask"] > 0
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inner.sum() > 50:
      assert sample["forged"][inner].std() < sample["authentic"][inner].std()


def test_coco_spg_is_deterministic_and_varies(coco_root, tmp_path, capsys):
  spec = f"coco_spg:{coco_root}"
  first = sources.make_source(spec, "train", image_size=64, seed=1)
  again = sources.make_source(spec, "train", image_size=64, seed=1)
  samples = [first[i] for i in range(3)]
  for index in (2, 0, 1):
    assert_same_samples(again[index], samples[index])
  assert samples[0]["forged"].tobytes() != samples[1]["forged"].tobytes()
  other_seed = sources.make_source(spec, "train", image_size=64, seed=2)[0]
  assert other_seed["forged"].tobytes() != samples[0]["forged"].tobytes()
  validation = sources.make_source(spec, "validation", image_size=64, seed=1)  # No split field.
  assert validation[0]["forged"].tobytes() != samples[0]["forged"].tobytes()
  # The same samples from a built coco_instances dataset.
  code = cli.main(
    [
      "data",
      "build",
      "coco_instances",
      "--manual-dir",
      str(coco_root),
      "--data-dir",
      str(tmp_path / "tfds"),
      "--builders",
      BUILDERS,
    ]
  )
  assert code == 0, capsys.readouterr().err[-2000:]
  built = sources.make_source(
    f"coco_spg:tfds:{tmp_path / 'tfds'}/coco_instances", "train", image_size=64, seed=1
  )
  for index in range(3):
    assert_same_samples(built[index], samples[index])
  # No object qualifies: both images are the crop, the mask is empty, and that is counted.
  fallback = sources.make_source(
    spec, "train", image_size=64, spg={"min_area": 5000, "max_attempts": 2}
  )
  sample = fallback[0]
  assert sample["kind"] == "authentic" and not sample["mask"].any() and not changes(sample).any()
  assert fallback.fallback_count == 1


def test_spg_config_and_errors(coco_root):
  data = ml_collections.ConfigDict(
    {
      "image_size": 64,
      "seed": 0,
      "spg": {"weights": [0, 2, 0], "min_area": 300},
      "pair_synth": {"crop_prob": 0.0},
    }
  )
  source = sources.source_from_config(f"coco_spg:{coco_root}", "train", data)
  assert source.config == SPGConfig(weights=(0, 2, 0), min_area=300)
  assert {source[i]["kind"] for i in range(3)} == {"remove"}
  with data.unlocked():
    data.spg.bogus = 1
  with pytest.raises(UserInputError, match="spg.bogus: unknown key"):
    sources.source_from_config(f"coco_spg:{coco_root}", "train", data)
  bad = [
    ({"weights": (0, 0, 0)}, "spg.weights: expected 3 weights"),
    ({"weights": (1, 1)}, "spg.weights"),
    ({"min_area": 0}, "spg.min_area"),
    ({"hue_shift": (50, 10)}, "spg.hue_shift"),
    ({"contrast_scale": (0, 1)}, "spg.contrast"),
    ({"min_changed_fraction": 2}, "spg.min_changed_fraction"),
  ]
  for settings, message in bad:
    with pytest.raises(UserInputError, match=message):
      SPGConfig.from_config(settings)
  one = coco.CocoInstances(str(coco_root))
  one._records = one._records[:1]
  with pytest.raises(UserInputError, match="'replace' edit needs at least 2 images"):
    pairs.SPGSource(one, 64, 0, 0)
  assert len(pairs.SPGSource(one, 64, 0, 0, SPGConfig(weights=(1, 1, 0)))) == 1
  with pytest.raises(UserInputError, match="coco_spg:/path/to/coco"):
    sources.make_source("coco_spg:", "train")


@pytest.mark.shared_data
def test_coco_spg_on_coco_mini(shared_data):
  root = os.path.join(shared_data, "coco_mini")
  if not os.path.isdir(root):
    pytest.skip("coco_mini is absent")
  source = sources.make_source(f"coco_spg:{root}", "train", image_size=128, seed=0)
  kinds = []
  for index in range(12):
    sample = source[index]
    check_spg_sample(sample, 128)
    kinds.append(sample["kind"])
  assert {"recolour", "remove", "replace"} <= set(kinds) and kinds.count("authentic") <= 2


# ---- pair_synth ------------------------------------------------------------------------------


def smooth_photo(height, width, seed):
  """A photo-like image: coarse colour fields, bilinearly enlarged, with a little grain."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
  image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.int16)
  return np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def photos(tmp_path):
  """Five PNG photos of different sizes, one in a subfolder (read recursively), and a text
  file that is not one."""
  root = tmp_path / "photos"
  (root / "sub").mkdir(parents=True)
  sizes = [(60, 80), (72, 56), (64, 64), (90, 70), (50, 100)]
  names = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]
  for k, (name, size) in enumerate(zip(names, sizes)):
    io.write_image(str(root / name), smooth_photo(*size, seed=k))
  (root / "notes.txt").write_text("not a photo")
  return root


def check_pair_synth_sample(source, index, sample):
  """The sample's labels and pixels against the recipe it was made by."""
  recipe, size = source.recipe(index), source.image_size
  assert set(sample) == CLASSIFIER_KEYS
  for key in ("authentic", "forged"):
    assert sample[key].shape == (size, size, 3) and sample[key].dtype == np.uint8
  assert sample["mask"].shape == (size, size) and sample["has_mask"] and not sample["is_jpeg"]
  assert sample["box"].dtype == np.float32 and sample["box"].shape == (4,)
  assert sample["id"] == os.path.relpath(source.photos[index], source.root)
  full_box = np.array([0, 0, 1, 1], np.float32)
  mask = sample["mask"]
  if not recipe.receiver:
    assert not mask.any()
  if not recipe.same_source:
    assert sample["same_source"] == 0 and sample["aligned"] == 0
    np.testing.assert_array_equal(sample["box"], full_box)
    # The blobs where they were pasted, or where they were cut from: either way in this frame.
    assert mask.any() == bool(recipe.receiver)
    return "negative"
  assert sample["same_source"] == 1 and recipe.b == recipe.a
  assert recipe.receiver in ("", "b") and recipe.donor != recipe.a
  photo = io.read_image(source.photos[recipe.a])
  whole_a = cv2.resize(photo, (size, size), interpolation=cv2.INTER_LINEAR)
  # A positive's A is never edited (swapped: it is 'forged').
  b_key, a_key = ("authentic", "forged") if recipe.swapped else ("forged", "authentic")
  np.testing.assert_array_equal(sample[a_key], whole_a)
  if recipe.crop is None:
    assert sample["aligned"] == 1
    np.testing.assert_array_equal(sample["box"], full_box)
    diff = np.abs(sample["authentic"].astype(int) - sample["forged"].astype(int)).max(-1)
    if not recipe.receiver:
      assert not diff.any()  # A copy, resized the same way: identical.
      return "aligned"
    # Only the blobs differ (up to the resize's rounding next to them), in either order.
    assert diff.any() and mask.any() and diff[mask == 0].max() <= 2
    return "aligned+blobs"
  assert sample["aligned"] == 0
  # B is the box's crop of A, resized.
  height, width = photo.shape[:2]
  x0, y0, x1, y1 = (int(round(v * s)) for v, s in zip(sample["box"], (width, height) * 2))
  side = (x1 - x0) / width
  assert 0.5 - 1 / width <= side <= 0.95 + 1 / width
  assert abs((y1 - y0) / height - side) <= 2 / min(height, width)  # The aspect is kept.
  expected = cv2.resize(photo[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_LINEAR)
  error = np.abs(sample[b_key].astype(int) - expected.astype(int)).max(-1)
  if not recipe.receiver:
    assert error.max() <= 2
    return "cropped"
  if not recipe.swapped:
    assert error[mask == 0].max() <= 2  # The blobs are where the mask says.
    return "cropped+blobs"
  # Swapped: the mask is in A's frame, inside the box (1 px of resampling).
  bx0, by0, bx1, by1 = (sample["box"] * size).tolist()
  outside = np.ones((size, size), bool)
  outside[
    max(0, int(by0) - 1) : int(np.ceil(by1)) + 1, max(0, int(bx0) - 1) : int(np.ceil(bx1)) + 1
  ] = False
  assert not mask[outside].any()
  return "cropped+blobs, swapped"


def test_pair_synth_labels_match_construction(photos):
  seen = set()
  spec = f"pair_synth:{photos}"
  sparse = {"positive_blob_prob": 0.3, "negative_blob_prob": 0.5, "crop_prob": 0.5}
  for settings in ({}, sparse):
    for seed in range(8):
      source = sources.make_source(spec, "train", image_size=40, seed=seed, pair_synth=settings)
      assert isinstance(source, pairs.PairSynthSource) and len(source) == 5
      for index in range(len(source)):
        seen.add(check_pair_synth_sample(source, index, source[index]))
        recipe = source.recipe(index)
        seen.add(("swapped", recipe.swapped))
        seen.add(("blobs", recipe.receiver))
  assert {
    "negative",
    "aligned",
    "aligned+blobs",
    "cropped",
    "cropped+blobs",
    "cropped+blobs, swapped",
    ("swapped", True),
    ("swapped", False),
    ("blobs", "a"),
    ("blobs", "b"),
    ("blobs", ""),
  } <= seen


def test_pair_synth_is_deterministic_and_varies(photos):
  spec = f"pair_synth:{photos}"
  # Every photo in both splits (no holdout; test_tasks covers the held-out split), so the
  # streams of the two splits can be compared item by item.
  settings = {"pair_synth": {"holdout": 0.0}}
  first = sources.make_source(spec, "train", image_size=40, seed=3, **settings)
  again = sources.make_source(spec, "train", image_size=40, seed=3, **settings)
  samples = [first[i] for i in range(5)]
  for index in (4, 0, 2):
    assert_same_samples(again[index], samples[index])
  assert len({s["forged"].tobytes() for s in samples}) == 5
  others = [
    sources.make_source(spec, "train", image_size=40, seed=4, **settings)[i] for i in range(5)
  ]
  assert any(a["forged"].tobytes() != b["forged"].tobytes() for a, b in zip(samples, others))
  validation = sources.make_source(spec, "validation", image_size=40, seed=3, **settings)
  assert [validation.recipe(i) for i in range(5)] != [first.recipe(i) for i in range(5)]
  assert [s["id"] for s in samples] == ["a.png", "b.png", "c.png", "d.png", "sub/e.png"]


def test_blobs_are_closed_shapes_and_blend_only_inside():
  rng = np.random.default_rng(0)
  for _ in range(10):
    shape = pairs.bezier_blob(30, 50, rng)
    x, y, w, h = cv2.boundingRect(shape)
    assert (w, h) in ((49, 29), (49, 30), (50, 29), (50, 30))  # It fills its box.
    # One piece without holes: a single outline (holes would be contours of their own).
    contours, _ = cv2.findContours(shape, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    assert len(contours) == 1
  receiver, donor = smooth_photo(80, 96, 1), smooth_photo(20, 24, 2)  # A donor smaller than blobs.
  for seed in range(6):
    cfg = PairSynthConfig(blob_blur_prob=0.5)
    out, alpha, taken = pairs.paste_blobs(receiver, donor, 3, np.random.default_rng(seed), cfg)
    assert out.dtype == np.uint8 and alpha.dtype == taken.dtype == np.float32
    assert alpha.shape == (80, 96) and taken.shape == (20, 24)  # Where cut from, in its frame.
    for region in (alpha, taken):
      assert 0 <= region.min() and region.max() <= 1 and region.max() > 0.9
    np.testing.assert_array_equal(out[alpha == 0], receiver[alpha == 0])
    # No blob's box exceeds 5/8 of a side: none covers the whole image.
    assert (alpha == 0).any()


def test_pair_synth_errors(photos, tmp_path):
  (tmp_path / "one").mkdir()
  io.write_image(str(tmp_path / "one" / "x.png"), smooth_photo(20, 20, 0))
  cases = [
    (f"pair_synth:{tmp_path / 'one'}", "needs at least 2 photos"),
    (f"pair_synth:{tmp_path / 'none'}", "none: no such directory"),
    ("pair_synth:", "give a path, pair_synth:/path/to/photos"),
  ]
  for spec, message in cases:
    with pytest.raises(UserInputError, match=message):
      sources.make_source(spec, "train")
  bad = [
    ({"crop_prob": 1.5}, "pair_synth.crop_prob"),
    ({"crop_range": (0.5, 1.2)}, "pair_synth.crop_range"),
    ({"blob_count": (3, 1)}, "pair_synth.blob_count"),
    ({"blob_points": (2, 4)}, "pair_synth.blob_points"),
    ({"blob_sizes": (0.1, 0.2)}, "pair_synth.blob_sizes: unknown key"),
  ]
  for settings, message in bad:
    with pytest.raises(UserInputError, match=message):
      sources.make_source(f"pair_synth:{photos}", "train", pair_synth=settings)
  source = sources.make_source(f"pair_synth:{photos}", "train", image_size=32)
  (photos / "c.png").write_bytes(b"")
  with pytest.raises(UserInputError, match=r"c\.png: not a readable image"):
    source[2]
  data = ml_collections.ConfigDict(
    {"image_size": 32, "seed": 0, "pair_synth": {"crop_range": [0.6, 0.7]}}
  )
  assert sources.source_from_config(f"pair_synth:{photos}", "train", data).config.crop_range == (
    0.6,
    0.7,
  )
  assert json.dumps(PairSynthConfig().__dict__)  # Plain values, for configs and reports.
