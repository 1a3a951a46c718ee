"""Object Jitter (geometry, selection, second object, rejection, blur table, determinism) and the
COCO source it runs on (polygon and RLE decoding, skipping, errors, the grain transform)."""

import json
import os

import cv2
import grain
import ml_collections
import numpy as np
import pytest

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input import coco
from miml_jax.input.object_jitter import ObjectJitterConfig, blur_kernel_size, object_jitter

NO_BLUR = ObjectJitterConfig(blur_prob=0.0)


def noise_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_masks(height, width, boxes):
  """(N, H, W) uint8 masks, one filled (x, y, w, h) rectangle each."""
  masks = np.zeros((len(boxes), height, width), np.uint8)
  for k, (x, y, w, h) in enumerate(boxes):
    masks[k, y : y + h, x : x + w] = 1
  return masks


def expected_extent(box, height, width):
  """The spec's enlarged box, clipped: (x0, y0, x1, y1) and the unclipped origin."""
  x, y, w, h = box
  pad_x, pad_y = round(w / 16), round(h / 16)
  bx, by = x - pad_x, y - pad_y
  bw, bh = w + 2 * pad_x, h + 2 * pad_y
  return (max(0, bx), max(0, by), min(width, bx + bw), min(height, by + bh)), (bx, by, bw, bh)


def region_count(mask):
  return cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=4)[0] - 1


# (x, y, w, h) boxes: interior, sides where h/16 is .5 (Python rounds half to even), and boxes
# touching each border, so the enlarged extent is clipped.
@pytest.mark.parametrize(
  "box",
  [
    (50, 40, 64, 48),
    (30, 20, 40, 24),
    (0, 0, 80, 64),
    (150, 100, 50, 60),
    (0, 70, 33, 90),
    (210, 0, 90, 17),
  ],
)
def test_rectangle_pasted_on_enlarged_centred_box(box):
  height, width = 160, 300
  image = noise_image(height, width)
  masks = box_masks(height, width, [box])
  out, mask = object_jitter(image, masks, np.random.default_rng(0), NO_BLUR)
  (x0, y0, x1, y1), (bx, by, bw, bh) = expected_extent(box, height, width)
  # A full rectangle's alpha is 1 over the whole enlarged box: the mask is exactly the extent.
  expected_mask = np.zeros((height, width), np.uint8)
  expected_mask[y0:y1, x0:x1] = 255
  np.testing.assert_array_equal(mask, expected_mask)
  outside = expected_mask == 0
  assert out[outside].tobytes() == image[outside].tobytes()
  x, y, w, h = box
  patch = cv2.resize(image[y : y + h, x : x + w], (bw, bh), interpolation=cv2.INTER_LINEAR)
  np.testing.assert_array_equal(out[y0:y1, x0:x1], patch[y0 - by : y1 - by, x0 - bx : x1 - bx])
  assert out.dtype == np.uint8 and mask.dtype == np.uint8
  assert image.tobytes() == noise_image(height, width).tobytes()  # The input is not modified.


def ellipse_masks(height, width, ellipses):
  masks = np.zeros((len(ellipses), height, width), np.uint8)
  for k, (centre, axes, angle) in enumerate(ellipses):
    cv2.ellipse(masks[k], centre, axes, angle, 0, 360, 1, -1)
  return masks


@pytest.mark.parametrize("blur_prob", [0.0, 1.0])
def test_mask_is_alpha_above_half_and_composite(blur_prob):
  height, width = 200, 220
  image = noise_image(height, width, seed=1)
  masks = ellipse_masks(height, width, [((100, 90), (60, 35), 30)])
  cfg = ObjectJitterConfig(blur_prob=blur_prob)
  out, mask = object_jitter(image, masks, np.random.default_rng(3), cfg)
  x, y, w, h = cv2.boundingRect(masks[0])
  (x0, y0, x1, y1), (bx, by, bw, bh) = expected_extent((x, y, w, h), height, width)
  alpha = cv2.resize(
    masks[0, y : y + h, x : x + w].astype(np.float32), (bw, bh), interpolation=cv2.INTER_LINEAR
  )
  if blur_prob:
    kernel = blur_kernel_size(min(w, h))
    assert kernel == 7
    alpha = cv2.GaussianBlur(alpha, (kernel, kernel), 0)
  full_alpha = np.zeros((height, width), np.float32)
  full_alpha[y0:y1, x0:x1] = alpha[y0 - by : y1 - by, x0 - bx : x1 - bx]
  np.testing.assert_array_equal(mask, np.where(full_alpha > 0.5, 255, 0).astype(np.uint8))
  untouched = full_alpha == 0
  assert out[untouched].tobytes() == image[untouched].tobytes()
  patch = np.zeros_like(image, dtype=np.float32)
  patch[y0:y1, x0:x1] = cv2.resize(
    image[y : y + h, x : x + w], (bw, bh), interpolation=cv2.INTER_LINEAR
  )[y0 - by : y1 - by, x0 - bx : x1 - bx]
  composite = patch * full_alpha[..., None] + image * (1 - full_alpha[..., None])
  assert np.abs(out.astype(np.float32) - composite).max() <= 1.0
  if blur_prob:
    # The blur softens the edge: some alpha is strictly between 0 and 1 near the outline.
    assert np.count_nonzero((full_alpha > 0.05) & (full_alpha < 0.95)) > 100


def test_blur_kernel_table():
  table = {
    0: 0,
    7: 0,
    15: 0,
    16: 3,
    31: 3,
    32: 5,
    63: 5,
    64: 7,
    127: 7,
    128: 9,
    255: 9,
    256: 11,
    4000: 11,
  }
  assert {side: blur_kernel_size(side) for side in table} == table


def test_small_objects_are_never_chosen():
  height, width = 128, 160
  image = noise_image(height, width)
  small = [
    (5, 5, 7, 100),  # 7 px wide.
    (20, 5, 100, 7),  # 7 px high.
    (30, 30, 20, 12),
  ]  # 240 px < 256.
  good = (100, 60, 16, 16)  # Exactly 8+ px sides and 256 px.
  masks = box_masks(height, width, small + [good])
  (x0, y0, x1, y1), _ = expected_extent(good, height, width)
  for seed in range(20):
    _, mask = object_jitter(image, masks, np.random.default_rng(seed), NO_BLUR)
    assert np.count_nonzero(mask[y0:y1, x0:x1]) == np.count_nonzero(mask) > 0
  masks_small = box_masks(height, width, small)
  assert all(object_jitter(image, masks_small, np.random.default_rng(s)) is None for s in range(20))
  assert (
    object_jitter(image, np.zeros((0, height, width), np.uint8), np.random.default_rng(0)) is None
  )
  assert object_jitter(image, np.zeros((2, height, width), bool), np.random.default_rng(0)) is None


def test_area_is_counted_on_the_mask_by_default():
  height, width = 96, 96
  image = noise_image(height, width)
  ring = np.zeros((1, height, width), np.uint8)
  cv2.rectangle(ring[0], (20, 20), (59, 59), 1, 1)  # A 40x40 box holding 156 pixels.
  assert object_jitter(image, ring, np.random.default_rng(0)) is None
  assert (
    object_jitter(
      image, ring.astype(bool), np.random.default_rng(0), ObjectJitterConfig(area_of="box")
    )
    is not None
  )


def grid_boxes(count, size=24, step=56):
  return [(8 + step * (k % 5), 8 + step * (k // 5), size, size) for k in range(count)]


def test_second_object_needs_more_than_eight_disjoint_others():
  height, width = 128, 288
  image = noise_image(height, width)
  always = ObjectJitterConfig(blur_prob=0.0, second_prob=1.0)
  ten = box_masks(height, width, grid_boxes(10))  # The chosen one and 9 others.
  nine = box_masks(height, width, grid_boxes(9))  # Only 8 others.
  for seed in range(10):
    _, mask = object_jitter(image, ten, np.random.default_rng(seed), always)
    assert region_count(mask) == 2
    _, mask = object_jitter(image, nine, np.random.default_rng(seed), always)
    assert region_count(mask) == 1
  # The spec's p = 0.5.
  twos = sum(
    region_count(object_jitter(image, ten, np.random.default_rng(s), NO_BLUR)[1]) == 2
    for s in range(60)
  )
  assert 15 <= twos <= 45


def test_objects_meeting_the_first_do_not_count():
  height, width = 128, 288
  image = noise_image(height, width)
  boxes = grid_boxes(10)
  x, y, w, h = boxes[0]
  boxes[1] = (x + w + 1, y, w, h)  # Right next to box 0: each meets the other's extent.
  masks = box_masks(height, width, boxes)
  pair = np.zeros((height, width), bool)
  pair[y : y + h, x : x + 2 * w + 1] = True
  always = ObjectJitterConfig(blur_prob=0.0, second_prob=1.0)
  counts = set()
  for seed in range(40):
    _, mask = object_jitter(image, masks, np.random.default_rng(seed), always)
    count = region_count(mask)
    counts.add(count)
    if count == 1:  # Only when the first is one of the pair are just 8 others left.
      assert np.any(mask[pair])
  assert counts == {1, 2}


def test_large_tampered_fraction_is_rejected():
  height, width = 100, 100
  image = noise_image(height, width)
  big = box_masks(height, width, [(7, 7, 86, 86)])  # 74%, and 92% once enlarged.
  assert all(object_jitter(image, big, np.random.default_rng(s)) is None for s in range(5))
  assert (
    object_jitter(
      image, big, np.random.default_rng(0), ObjectJitterConfig(max_tampered_fraction=1.0)
    )
    is not None
  )


def scene(seed, height=192, width=256, count=12):
  rng = np.random.default_rng(seed)
  masks = np.zeros((count, height, width), np.uint8)
  for k in range(count):
    centre = (int(rng.integers(20, width - 20)), int(rng.integers(20, height - 20)))
    axes = (int(rng.integers(6, 30)), int(rng.integers(6, 30)))
    cv2.ellipse(masks[k], centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
  return noise_image(height, width, seed), masks


def test_deterministic_given_the_rng():
  image, masks = scene(5)
  cfg = ObjectJitterConfig(blur_prob=0.5)
  results = [object_jitter(image, masks, np.random.default_rng(s), cfg) for s in range(6)]
  again = [object_jitter(image, masks, np.random.default_rng(s), cfg) for s in range(6)]
  for a, b in zip(results, again):
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
  assert len({r[1].tobytes() for r in results}) > 1


def test_config_from_config():
  cfg = ObjectJitterConfig.from_config(
    ml_collections.ConfigDict(
      {"min_side": 4, "blur_kernels": [0, 3, 3, 5, 5, 7], "second_prob": 0.25}
    )
  )
  assert cfg.min_side == 4 and cfg.blur_kernels == (0, 3, 3, 5, 5, 7) and cfg.second_prob == 0.25
  assert ObjectJitterConfig.from_config({}) == ObjectJitterConfig()
  with pytest.raises(UserInputError, match="min_sid"):
    ObjectJitterConfig.from_config({"min_sid": 4})
  with pytest.raises(UserInputError, match="blur_kernels"):
    ObjectJitterConfig.from_config({"blur_kernels": [0, 3, 5]})
  with pytest.raises(UserInputError, match="second_prob"):
    ObjectJitterConfig(second_prob=1.5)
  with pytest.raises(UserInputError, match="area_of"):
    ObjectJitterConfig(area_of="pixels")


def encode_runs(mask):
  """Column-major run lengths of a {0, 1} mask, starting with a (possibly empty) 0 run."""
  flat = mask.T.ravel()
  changes = np.flatnonzero(np.diff(flat)) + 1
  edges = np.concatenate([[0], changes, [flat.size]])
  runs = np.diff(edges).tolist()
  return ([0] + runs) if flat[0] else runs


def compress(runs):
  """COCO's RLE string, written independently of coco.encode_rle_string."""
  out = ""
  for i, run in enumerate(runs):
    value = run - runs[i - 2] if i > 2 else run
    while True:
      group = value & 31
      value >>= 5
      done = value == -1 if group & 16 else value == 0
      out += chr(48 + group + (0 if done else 32))
      if done:
        break
  return out


def test_rle_strings():
  # Worked by hand: 100 needs two groups; 50 has bit 0x10 set; the last run is a negative delta.
  assert coco.decode_rle_string("T33b14") == [100, 3, 50, 7]
  assert coco.decode_rle_string("5:5H") == [5, 10, 5, 2]
  runs = encode_runs(ellipse_masks(37, 53, [((20, 15), (14, 9), 25)])[0])
  assert coco.decode_rle_string(compress(runs)) == runs
  assert coco.encode_rle_string(runs) == compress(runs)
  with pytest.raises(ValueError):
    coco.rle_to_mask([3, 4], 3, 3)


@pytest.fixture
def coco_folder(tmp_path):
  """A tiny COCO folder: a.png (polygon, uncompressed RLE, compressed RLE, crowd), b.png (no
  annotation), c.png (corrupt, annotated)."""
  height, width = 48, 64
  (tmp_path / "images").mkdir()
  (tmp_path / "annotations").mkdir()
  io.write_image(str(tmp_path / "images" / "a.png"), noise_image(height, width))
  io.write_image(str(tmp_path / "images" / "b.png"), noise_image(height, width, 1))
  (tmp_path / "images" / "c.png").write_bytes(b"not a png")
  square = box_masks(height, width, [(30, 5, 12, 20)])[0]
  ellipse = ellipse_masks(height, width, [((20, 30), (12, 8), 20)])[0]
  size = [height, width]
  annotations = [
    {
      "id": 1,
      "image_id": 1,
      "iscrowd": 0,
      "segmentation": [[5, 5, 25, 5, 25, 15, 5, 15], [40, 30, 60, 30, 50, 45]],
    },
    {
      "id": 2,
      "image_id": 1,
      "iscrowd": 0,
      "segmentation": {"size": size, "counts": encode_runs(square)},
    },
    {
      "id": 3,
      "image_id": 1,
      "iscrowd": 0,
      "segmentation": {"size": size, "counts": compress(encode_runs(ellipse))},
    },
    {
      "id": 4,
      "image_id": 1,
      "iscrowd": 1,
      "segmentation": {"size": size, "counts": encode_runs(square)},
    },
    {
      "id": 5,
      "image_id": 3,
      "iscrowd": 0,
      "segmentation": {"size": size, "counts": encode_runs(square)},
    },
  ]
  images = [
    {"id": k, "file_name": name, "height": height, "width": width}
    for k, name in ((1, "a.png"), (2, "b.png"), (3, "c.png"))
  ]
  (tmp_path / "annotations" / "instances.json").write_text(
    json.dumps({"images": images, "annotations": annotations, "categories": []})
  )
  return tmp_path, square, ellipse


def test_coco_source_decodes_and_skips(coco_folder):
  root, square, ellipse = coco_folder
  source = coco.CocoInstances(str(root))
  assert len(source) == 2 and source.num_skipped == 1
  item = source[0]
  assert item["name"] == "a.png" and item["image"].shape == (48, 64, 3)
  instances = item["instances"]
  assert instances.dtype == np.uint8 and instances.shape == (3, 48, 64)
  polygon = instances[0].astype(bool)
  # Rectangle 5..25 x 5..15 in pixel-edge coordinates: its inside pixels, give or take the
  # outline (OpenCV fills what the outline touches).
  assert polygon[6:14, 6:24].all() and not polygon[:4].any() and not polygon[17:28].any()
  assert polygon[31:36, 45:56].all() and polygon[42, 50]  # The triangle: a second part.
  assert not polygon[:, 27:39].any()
  np.testing.assert_array_equal(instances[1], square)
  np.testing.assert_array_equal(instances[2], ellipse)
  assert coco.CocoInstances(str(root), include_crowd=True)[0]["instances"].shape[0] == 4


def test_coco_source_errors(coco_folder):
  root, _, _ = coco_folder
  source = coco.CocoInstances(str(root))
  with pytest.raises(UserInputError, match="c.png"):
    source[1]
  with pytest.raises(UserInputError, match="annotation"):
    coco.CocoInstances(str(root / "images"))


def test_transform_in_grain_and_fallback(coco_folder):
  root, _, _ = coco_folder
  source = coco.CocoInstances(str(root))
  items = [source[0]] * 3
  transform = coco.ObjectJitterTransform(32, config=ObjectJitterConfig(min_area=64))
  dataset = grain.MapDataset.source(items).seed(7).random_map(transform)
  first = [dataset[i] for i in range(3)]
  again = grain.MapDataset.source(items).seed(7).random_map(transform)
  for a, b in zip(first, [again[i] for i in range(3)]):
    assert a["image"].tobytes() == b["image"].tobytes()
    assert a["mask"].tobytes() == b["mask"].tobytes()
    assert a["image"].shape == (32, 32, 3) and a["mask"].shape == (32, 32)
    assert set(np.unique(a["mask"])) <= {0, 255}
  # No qualifying object: the crop comes back authentic, and the fallback is counted.
  image = noise_image(32, 32)
  fallback = coco.ObjectJitterTransform(
    32, resize_range=(1.0, 1.0), config=ObjectJitterConfig(max_attempts=3)
  )
  out = fallback.random_map(
    {"image": image, "instances": np.zeros((1, 32, 32), np.uint8)}, np.random.default_rng(0)
  )
  assert out["image"].tobytes() == image.tobytes() and not out["mask"].any()
  assert fallback.fallback_count == 1


@pytest.mark.shared_data
def test_real_coco_images(shared_data):
  root = os.path.join(shared_data, "coco_mini")
  if not os.path.isdir(root):
    pytest.skip("coco_mini is absent")
  source = coco.CocoInstances(root)
  transform = coco.ObjectJitterTransform(256)
  outputs = [transform.random_map(source[i], np.random.default_rng(i)) for i in range(3)]
  for out in outputs:
    assert out["image"].shape == (256, 256, 3) and out["image"].dtype == np.uint8
    assert out["mask"].shape == (256, 256) and out["mask"].dtype == np.uint8
    assert set(np.unique(out["mask"])) <= {0, 255}
  assert sum(bool(out["mask"].any()) for out in outputs) >= 2


def test_coco_data_source_feeds_the_training_pipeline(tmp_path):
  """`data.train=coco:PATH`: Object Jitter forgeries, deterministic per (seed, index)."""
  from miml_jax.input import pipeline, sources, transforms
  from miml_jax.tasks import segmentation

  (tmp_path / "images").mkdir()
  (tmp_path / "annotations").mkdir()
  images, annotations = [], []
  for k in range(2):
    io.write_image(str(tmp_path / "images" / f"{k}.png"), noise_image(80, 96, seed=k))
    images.append(
      {"id": k, "file_name": f"{k}.png", "height": 80, "width": 96, "split": "train2017"}
    )
    x, y = 20 + 10 * k, 15
    annotations.append(
      {
        "id": 10 + k,
        "image_id": k,
        "iscrowd": 0,
        "segmentation": [[x, y, x + 40, y, x + 40, y + 36, x, y + 36]],
      }
    )
  (tmp_path / "annotations" / "instances.json").write_text(
    json.dumps({"images": images, "annotations": annotations})
  )
  source = sources.make_source(f"coco:{tmp_path}", "train", image_size=64, seed=3)
  assert len(source) == 2
  item = source[1]
  assert item["image"].shape == (64, 64, 3) and item["mask"].shape == (64, 64)
  assert item["id"] == "1.png" and item["mask"].any()
  again = sources.make_source(f"coco:{tmp_path}", "train", image_size=64, seed=3)[1]
  assert again["image"].tobytes() == item["image"].tobytes()
  other = sources.make_source(f"coco:{tmp_path}", "train", image_size=64, seed=4)[1]
  assert other["image"].tobytes() != item["image"].tobytes()
  augment = transforms.AugmentConfig.from_config(
    {
      "crop_size": 64,
      "resize_range": (1.0, 1.0),
      "hflip": 0.5,
      "vflip": 0.0,
      "rot90": 0.0,
      "jpeg_prob": 0.0,
      "jpeg_quality": (70, 100),
      "rgb_shift_prob": 0.0,
      "rgb_shift": 0,
      "mask_low": 8,
      "mask_high": 192,
    }
  )
  batch = next(
    iter(
      pipeline.train_dataset(
        source, batch_size=2, transform=segmentation.train_transform(augment), seed=0
      )
    )
  )
  assert batch["image"].shape == (2, 64, 64, 3) and batch["label"].shape == (2, 64, 64)
  assert set(np.unique(batch["label"])) <= {0, 1}
  with pytest.raises(UserInputError, match="coco:/path"):
    sources.make_source("coco:", "train")
  with pytest.raises(UserInputError, match="coco:PATH"):
    sources.make_source("cocoa:x", "train")
