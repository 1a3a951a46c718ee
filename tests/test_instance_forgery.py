"""The coco_instances TFDS builder (both COCO layouts, read back exactly as CocoInstances reads the
folder, so Object Jitter, splicing and copy-move give identical samples on either), and synthetic
splicing / copy-move from instance masks: masks that are exactly the changed pixels, occlusion,
clipping, rejection rules, fallback, determinism, and errors for bad annotation files."""

import json
import os
import shutil

import cv2
import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.errors import UserInputError
from miml_jax.input import coco, instance_forgery, sources, transforms
from miml_jax.input.instance_forgery import InstanceForgeryConfig
from miml_jax.input.transforms import decode_label

BUILDERS = os.path.join(os.path.dirname(__file__), "..", "datasets")
HEIGHT, WIDTH = 64, 80


def noise(height, width, seed, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, (height, width, 3), dtype=np.uint8)


def ellipse(height, width, centre, axes, angle=0.0):
  mask = np.zeros((height, width), np.uint8)
  cv2.ellipse(mask, centre, axes, angle, 0, 360, 1, -1)
  return mask


def column_runs(mask):
  """Column-major run lengths starting with a 0 run, pixel by pixel (independent of coco.py)."""
  runs, current, length = [], 0, 0
  for value in np.asarray(mask).T.ravel() != 0:
    if value != current:
      runs.append(length)
      current, length = value, 0
    length += 1
  return runs + [length]


def polygon(x, y, w, h):
  return [x, y, x + w, y, x + w, y + h, x, y + h]


def write_coco(root, images, annotations, layout_file="instances.json"):
  (root / "annotations").mkdir(parents=True, exist_ok=True)
  (root / "annotations" / layout_file).write_text(
    json.dumps({"images": images, "annotations": annotations, "categories": []})
  )


@pytest.fixture
def coco_tree(tmp_path):
  """images/ + annotations/instances.json: train a.png (two overlapping polygons, an
  uncompressed RLE), b.jpg (a compressed RLE string, a polygon), e.png (crowd only: left out);
  val c.png (a polygon), d.png (no annotation: left out)."""
  root = tmp_path / "coco"
  (root / "images").mkdir(parents=True)
  names = ["a.png", "b.jpg", "c.png", "d.png", "e.png"]
  for k, name in enumerate(names):
    io.write_image(str(root / "images" / name), noise(HEIGHT, WIDTH, k))
  splits = ["train2017", "train2017", "val2017", "val2017", "train2017"]
  images = [
    {"id": 100 + k, "file_name": name, "height": HEIGHT, "width": WIDTH, "split": split}
    for k, (name, split) in enumerate(zip(names, splits))
  ]
  size = [HEIGHT, WIDTH]
  blob = ellipse(HEIGHT, WIDTH, (55, 40), (14, 10), 30)
  disc = ellipse(HEIGHT, WIDTH, (25, 30), (16, 12))
  annotations = [
    {
      "id": 1,
      "image_id": 100,
      "category_id": 3,
      "iscrowd": 0,
      "segmentation": [polygon(4, 4, 30, 24)],
    },
    {
      "id": 2,
      "image_id": 100,
      "category_id": 1,
      "iscrowd": 0,  # Overlaps annotation 1.
      "segmentation": [polygon(20, 14, 30, 30)],
    },
    {
      "id": 3,
      "image_id": 100,
      "category_id": 7,
      "iscrowd": 0,
      "segmentation": {"size": size, "counts": column_runs(blob)},
    },
    {
      "id": 2000000004,
      "image_id": 101,
      "category_id": 18,
      "iscrowd": 0,
      "segmentation": {"size": size, "counts": coco.encode_rle_string(column_runs(disc))},
    },
    {
      "id": 5,
      "image_id": 101,
      "category_id": 1,
      "iscrowd": 0,
      "segmentation": [polygon(44, 6, 28, 40)],
    },
    {
      "id": 6,
      "image_id": 102,
      "category_id": 2,
      "iscrowd": 0,
      "segmentation": [polygon(10, 10, 40, 30)],
    },
    {
      "id": 7,
      "image_id": 104,
      "category_id": 1,
      "iscrowd": 1,
      "segmentation": {"size": size, "counts": column_runs(disc)},
    },
  ]
  write_coco(root, images, annotations)
  return root, {"blob": blob, "disc": disc}


def build(manual, data_dir, capsys):
  code = cli.main(
    [
      "data",
      "build",
      "coco_instances",
      "--manual-dir",
      str(manual),
      "--data-dir",
      str(data_dir),
      "--builders",
      BUILDERS,
      "--json",
    ]
  )
  out, err = capsys.readouterr()
  assert code == 0, err[-2000:]
  return json.loads(out)["splits"]


def assert_same_items(a, b):
  assert a["name"] == b["name"]
  for key in ("image", "instances", "category_ids", "annotation_ids", "areas"):
    assert a[key].dtype == b[key].dtype, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def assert_same_samples(a, b):
  assert sorted(a) == sorted(b)
  for key, value in a.items():
    if isinstance(value, np.ndarray):
      assert value.tobytes() == b[key].tobytes(), key
    else:
      assert value == b[key], key


def test_mask_runs_round_trip():
  rng = np.random.default_rng(0)
  masks = [
    np.zeros((5, 7), np.uint8),
    np.ones((5, 7), np.uint8),
    ellipse(37, 53, (20, 15), (14, 9), 25),
    (rng.random((9, 11)) < 0.5).astype(np.uint8),
  ]
  masks[3][0, 0] = 1  # The first run is an empty 0 run.
  for mask in masks:
    runs = coco.mask_to_runs(mask)
    assert runs.tolist() == column_runs(mask)
    np.testing.assert_array_equal(coco.rle_to_mask(runs, *mask.shape), mask)
    assert coco.decode_rle_string(coco.encode_rle_string(runs)) == runs.tolist()


def test_builder_reads_back_like_the_folder(coco_tree, tmp_path, capsys):
  root, shapes = coco_tree
  data_dir = tmp_path / "tfds"
  assert build(root, data_dir, capsys) == {"train": 2, "validation": 1}
  for split, coco_split in (("train", "train"), ("validation", "val")):
    folder = coco.CocoInstances(str(root), split_name=coco_split)
    built = sources.make_source(f"coco:tfds:{data_dir}/coco_instances", split).coco
    assert isinstance(built, coco.BuiltCocoInstances) and len(built) == len(folder)
    for index in range(len(folder)):
      assert_same_items(built[index], folder[index])
      # The original file's bytes, never re-encoded (b.jpg stays that JPEG).
      assert built._records[index]["image"] == io.read_bytes(folder.image_info(index)["path"])
  train = coco.CocoInstances(str(root))
  a, b = train[0], train[1]
  assert [a["name"], b["name"]] == ["a.png", "b.jpg"]
  assert a["category_ids"].tolist() == [3, 1, 7] and b["annotation_ids"].tolist() == [2000000004, 5]
  np.testing.assert_array_equal(a["instances"][2], shapes["blob"])
  np.testing.assert_array_equal(b["instances"][0], shapes["disc"])
  assert a["areas"].tolist() == [int(m.sum()) for m in a["instances"]]
  assert (a["instances"][0] & a["instances"][1]).any()  # Overlapping masks both survive.
  # Every consumer gives identical samples on the folder and on the built dataset.
  for kind in ("coco", "coco_splice", "coco_copymove"):
    for split in ("train", "validation"):
      if kind == "coco_splice" and split == "validation":
        continue  # One validation image: no donor (tested below).
      on_folder = sources.make_source(f"{kind}:{root}", split, image_size=64, seed=5)
      on_built = sources.make_source(
        f"{kind}:tfds:{data_dir}/coco_instances", split, image_size=64, seed=5
      )
      assert len(on_folder) == len(on_built)
      for index in range(len(on_folder)):
        assert_same_samples(on_built[index], on_folder[index])
  # A named split, and a split that is not there.
  explicit = sources.make_source(
    f"coco:tfds:{data_dir}/coco_instances@validation", "train", image_size=64
  )
  assert explicit[0]["id"] == "c.png"
  with pytest.raises(UserInputError, match="no split 'test'"):
    sources.make_source(f"coco:tfds:{data_dir}/coco_instances@test", "train")
  # Without coco: the instances are not forgeries yet, and the error says how to read them.
  with pytest.raises(UserInputError, match="read through coco:"):
    sources.make_source(f"tfds:{data_dir}/coco_instances", "train")


def test_builder_official_layout(tmp_path, capsys):
  root = tmp_path / "coco2017"
  # Enough train images that a hash-shuffled order would show (the builder keeps the folder's).
  train_names = ["7.jpg", "2.png", "5.png", "1.png", "8.png", "4.png"]
  for split, names in (("train", train_names), ("val", ["3.png"])):
    (root / f"{split}2017").mkdir(parents=True)
    images, annotations = [], []
    for name in names:
      image_id = int(name[0])
      io.write_image(str(root / f"{split}2017" / name), noise(HEIGHT, WIDTH, image_id))
      images.append({"id": image_id, "file_name": name, "height": HEIGHT, "width": WIDTH})
      annotations.append(
        {
          "id": 10 * image_id,
          "image_id": image_id,
          "category_id": image_id,
          "iscrowd": 0,
          "segmentation": [polygon(8, 8, 20 + image_id, 30)],
        }
      )
    write_coco(root, images, annotations, f"instances_{split}2017.json")
  assert coco.find_splits(str(root)).keys() == {"train", "val"}
  data_dir = tmp_path / "tfds"
  assert build(root, data_dir, capsys) == {"train": 6, "validation": 1}
  for split, coco_split in (("train", "train"), ("validation", "val")):
    folder = coco.CocoInstances(str(root), split_name=coco_split)
    built = sources.make_source(f"coco:tfds:{data_dir}/coco_instances", split).coco
    assert [built[i]["name"] for i in range(len(built))] == (
      train_names if split == "train" else ["3.png"]
    )
    for index in range(len(folder)):
      assert_same_items(built[index], folder[index])


def test_paste_is_clipped_and_occluded():
  host = np.zeros((20, 30, 3), np.uint8)
  patch = np.full((10, 12, 3), 200, np.uint8)
  alpha = np.ones((10, 12), bool)
  alpha[0, 0] = False
  occluder = np.zeros((20, 30), bool)
  occluder[:, 25:27] = True
  out, written = instance_forgery.paste(host, patch, alpha, 22, -3, occluder)
  expected = np.zeros((20, 30), bool)
  expected[0:7, 22:30] = True  # Rows -3..6 and columns 22..33, clipped to the host.
  expected[:, 25:27] = False  # Behind the occluder.
  np.testing.assert_array_equal(written, expected)
  np.testing.assert_array_equal(out.any(-1), written)
  assert (out[written] == 200).all() and not host.any()  # The host itself is untouched.
  out, written = instance_forgery.paste(host, patch, alpha, 40, 0)  # Wholly outside.
  assert not written.any() and not out.any()


def host_and_objects(seed=0):
  """A host crop (noise in 0..99) with two objects, and a donor (noise in 150..255) with three."""
  host = noise(96, 96, seed, 0, 100)
  host_objects = np.stack(
    [ellipse(96, 96, (30, 30), (14, 10)), ellipse(96, 96, (70, 64), (12, 18), 40)]
  )
  donor = noise(80, 90, seed + 1, 150, 256)
  donor_objects = np.stack(
    [
      ellipse(80, 90, (25, 25), (15, 12), 10),
      ellipse(80, 90, (60, 50), (18, 14), 70),
      ellipse(80, 90, (45, 20), (10, 16)),
    ]
  )
  return host, host_objects, donor, donor_objects


def splices(cfg, seeds, occluders=True):
  """host_and_objects()'s splices under `cfg`, one per seed, the failed draws left out (with
  the host's objects as occluders unless `occluders` is False)."""
  host, host_objects, donor, donor_objects = host_and_objects()
  others = host_objects if occluders else None
  made = (
    instance_forgery.splice(
      host, donor, donor_objects, np.random.default_rng(s), cfg, host_instances=others
    )
    for s in range(seeds)
  )
  return [r for r in made if r is not None]


def test_splice_mask_is_exactly_the_changed_pixels():
  host, host_objects, donor, donor_objects = host_and_objects()
  cfg = InstanceForgeryConfig(occlude_prob=0.5, min_area=64)
  made = splices(cfg, 24)
  assert len(made) >= 18
  front = host_objects.any(0)
  for result in made:
    mask = result.mask > 0
    assert result.mask.dtype == np.uint8 and set(np.unique(result.mask)) <= {0, 255}
    # Donor and host pixels never coincide, so the mask is exactly what changed.
    np.testing.assert_array_equal(mask, (result.image != host).any(-1))
    assert (result.image[mask] >= 150).all() and np.count_nonzero(mask) >= cfg.min_area
    if result.occluded:
      assert not (mask & front).any()
    # The composite is the donor object cut at the drawn scale and mirror, pasted at (x, y).
    patch, alpha = instance_forgery.cut_object(
      donor, donor_objects[result.object_index], result.scale, result.flip
    )
    expected, written = instance_forgery.paste(
      host, patch, alpha, result.x, result.y, front if result.occluded else None
    )
    assert expected.tobytes() == result.image.tobytes()
    np.testing.assert_array_equal(written, mask)
  assert {r.occluded for r in made} == {True, False} and {r.flip for r in made} == {True, False}
  assert len({r.object_index for r in made}) == 3
  # Some pastes hang over an edge (clipped), some go behind a host object (hidden in part).
  clipped = hidden = 0
  for r in made:
    patch, alpha = instance_forgery.cut_object(
      donor, donor_objects[r.object_index], r.scale, r.flip
    )
    placed = instance_forgery.paste(host, patch, alpha, r.x, r.y)[1]
    clipped += np.count_nonzero(placed) < np.count_nonzero(alpha)
    hidden += r.occluded and bool((placed & front).any())
  assert clipped and hidden


def test_copy_move_copies_an_object_elsewhere():
  image, objects, _, _ = host_and_objects(3)
  inside = objects.any(0)
  image[inside] = noise(96, 96, 9, 150, 256)[inside]  # Objects bright, background dark.
  cfg = InstanceForgeryConfig(occlude_prob=0.5, min_area=64, scale_range=(0.8, 1.2))
  made = [
    instance_forgery.copy_move(image, objects, np.random.default_rng(seed), cfg)
    for seed in range(24)
  ]
  made = [r for r in made if r is not None]
  assert len(made) >= 12
  for result in made:
    mask = result.mask > 0
    np.testing.assert_array_equal(mask, (result.image != image).any(-1))
    # Not over the object it copies: the copy's pixels lie outside the source's box.
    x, y, w, h = cv2.boundingRect(objects[result.object_index])
    assert not mask[y : y + h, x : x + w].any()
    patch, alpha = instance_forgery.cut_object(
      image, objects[result.object_index], result.scale, result.flip
    )
    others = np.delete(objects, result.object_index, axis=0).any(0)
    expected, written = instance_forgery.paste(
      image, patch, alpha, result.x, result.y, others if result.occluded else None
    )
    assert expected.tobytes() == result.image.tobytes()
    np.testing.assert_array_equal(written, mask)
  assert len({r.scale for r in made}) == len(made) and {r.flip for r in made} == {True, False}


def test_rejection_rules():
  host, host_objects, donor, _ = host_and_objects()
  cfg = InstanceForgeryConfig(scale_range=(1.0, 1.0))
  tiny = np.zeros((2, 80, 90), np.uint8)
  tiny[0, 5:75, 10:15] = 1  # 350 px, but 5 px wide.
  tiny[1, 30:44, 50:64] = 1  # 14 x 14 = 196 px < 256.
  huge = np.zeros((1, 80, 90), np.uint8)
  huge[0, 2:78, 2:88] = 1  # 6536 px > half of a 96 x 96 crop (4608).
  good = ellipse(80, 90, (45, 40), (16, 12))[None]
  rngs = [np.random.default_rng(s) for s in range(10)]
  assert all(instance_forgery.splice(host, donor, tiny, r, cfg) is None for r in rngs)
  assert all(instance_forgery.splice(host, donor, huge, r, cfg) is None for r in rngs)
  assert all(instance_forgery.copy_move(donor, tiny, r, cfg) is None for r in rngs)
  assert (
    instance_forgery.splice(host, donor, np.zeros((0, 80, 90), bool), np.random.default_rng(0), cfg)
    is None
  )
  # Among tiny, huge and one good object, the good one is always the one pasted.
  mixed = np.concatenate([tiny, huge, good])
  for seed in range(10):
    result = instance_forgery.splice(host, donor, mixed, np.random.default_rng(seed), cfg)
    assert result is not None and result.object_index == 3
  # Pasted behind a host object that covers the whole crop: nothing is written, rejected.
  wall = np.ones((1, 96, 96), np.uint8)
  hidden = InstanceForgeryConfig(scale_range=(1.0, 1.0), occlude_prob=1.0)
  assert (
    instance_forgery.splice(
      host, donor, good, np.random.default_rng(0), hidden, host_instances=wall
    )
    is None
  )
  # A frame whose box is the whole crop leaves no place clear of it for its copy.
  frame = np.zeros((1, 96, 96), np.uint8)
  cv2.rectangle(frame[0], (0, 0), (95, 95), 1, 4)
  assert all(
    instance_forgery.copy_move(host, frame, np.random.default_rng(s), cfg) is None for s in range(5)
  )
  with_others = np.concatenate([frame, host_objects])
  copies = [
    instance_forgery.copy_move(host, with_others, np.random.default_rng(s), cfg) for s in range(10)
  ]
  assert {c.object_index for c in copies if c is not None} == {1, 2}


def test_source_is_deterministic_per_index_and_falls_back(coco_tree, tmp_path):
  root, _ = coco_tree
  for kind, mode in (("coco_splice", "splice"), ("coco_copymove", "copy_move")):
    source = sources.make_source(f"{kind}:{root}", "train", image_size=64, seed=1)
    assert isinstance(source, instance_forgery.InstanceForgerySource) and len(source) == 2
    first = [source[i] for i in range(2)]
    again = sources.make_source(f"{kind}:{root}", "train", image_size=64, seed=1)
    for index in (1, 0):  # Any order, any instance of the source.
      assert_same_samples(again[index], first[index])
    assert first[0]["image"].tobytes() != first[1]["image"].tobytes()
    other_seed = sources.make_source(f"{kind}:{root}", "train", image_size=64, seed=2)[0]
    assert other_seed["image"].tobytes() != first[0]["image"].tobytes()
    for index, sample in enumerate(first):
      assert sample["image"].shape == (64, 64, 3) and sample["mask"].shape == (64, 64)
      assert sample["kind"] == mode and sample["mask"].any() and not sample["is_jpeg"]
      assert sample["id"] == ["a.png", "b.jpg"][index]
      assert sample["donor"] == (["b.jpg", "a.png"][index] if mode == "splice" else sample["id"])
  # The split, mode and seed streams differ: the same host gives different forgeries.
  jitter = sources.make_source(f"coco:{root}", "train", image_size=64, seed=1)[0]
  splice = sources.make_source(f"coco_splice:{root}", "train", image_size=64, seed=1)[0]
  assert jitter["image"].tobytes() != splice["image"].tobytes()
  # Only tiny objects: every attempt fails and the crop comes back authentic.
  folder = coco.CocoInstances(str(root))
  source = instance_forgery.InstanceForgerySource(
    folder,
    "copy_move",
    crop_size=64,
    seed=0,
    split_id=0,
    keep_host=True,
    config=InstanceForgeryConfig(min_area=2000, max_attempts=3),
  )
  sample = source[0]
  assert sample["kind"] == "authentic" and sample["donor"] == "" and not sample["mask"].any()
  assert sample["image"].tobytes() == sample["host_image"].tobytes()
  assert source.fallback_count == 1


def test_errors_name_the_problem(coco_tree, tmp_path, capsys):
  root, _ = coco_tree
  empty = tmp_path / "no_annotations"
  (empty / "images").mkdir(parents=True)
  for kind in ("coco", "coco_splice", "coco_copymove"):
    with pytest.raises(UserInputError, match="no COCO annotation file"):
      sources.make_source(f"{kind}:{empty}", "train")
    with pytest.raises(UserInputError, match=f"{kind}:/path/to/coco"):
      sources.make_source(f"{kind}:", "train")
  code = cli.main(
    [
      "data",
      "build",
      "coco_instances",
      "--manual-dir",
      str(empty),
      "--data-dir",
      str(tmp_path / "out"),
      "--builders",
      BUILDERS,
    ]
  )
  assert code == 2 and "no COCO annotation file" in capsys.readouterr().err
  annotation_file = root / "annotations" / "instances.json"
  good = annotation_file.read_text()
  bad_files = [
    ("{not json", "not a COCO annotation file"),
    (json.dumps({"images": []}), "needs 'images' and 'annotations'"),
    (json.dumps({"images": {}, "annotations": []}), "must be lists"),
    (
      good.replace('"segmentation": [[10', '"segmentation": "x", "y": [[10'),
      "segmentation must be polygons or an RLE dict",
    ),
    (good.replace('"image_id": 102', '"image_id": 999'), "image_id 999"),
  ]
  for text, message in bad_files:
    annotation_file.write_text(text)
    with pytest.raises(UserInputError, match=message) as error:
      sources.make_source(f"coco_splice:{root}", "validation")
    assert str(annotation_file) in str(error.value)
    code = cli.main(
      [
        "data",
        "build",
        "coco_instances",
        "--manual-dir",
        str(root),
        "--data-dir",
        str(tmp_path / "out"),
        "--builders",
        BUILDERS,
      ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(annotation_file) in err, err[-2000:]
  annotation_file.write_text(good)
  with pytest.raises(UserInputError, match="at least 2 images"):
    sources.make_source(f"coco_splice:{root}", "validation")
  with pytest.raises(UserInputError, match="not a coco_instances dataset"):
    coco.BuiltCocoInstances([{"image": b"", "mask": b"", "id": b"x"}], "tfds:other")
  with pytest.raises(UserInputError, match="scale_range"):
    InstanceForgeryConfig(scale_range=(0.0, 1.0))
  with pytest.raises(UserInputError, match="min_are"):
    InstanceForgeryConfig.from_config({"min_are": 3})
  assert InstanceForgeryConfig.from_config({"scale_range": [1, 2]}).scale_range == (1.0, 2.0)
  with pytest.raises(UserInputError, match="mode"):
    instance_forgery.InstanceForgerySource(coco.CocoInstances(str(root)), "jitter", 32, 0, 0)


def test_real_coco_subset_builds(shared_data, tmp_path, capsys):
  """20 coco_mini images (10 with polygons only, 10 with RLE strings) in a folder of their own:
  the full 741 would take too long on the CI machine's 2 cores."""
  source = os.path.join(shared_data, "coco_mini")
  if not os.path.isdir(source):
    pytest.skip("coco_mini is absent")
  with open(os.path.join(source, "annotations", "instances.json")) as f:
    data = json.load(f)
  by_image = {}
  for annotation in data["annotations"]:
    by_image.setdefault(annotation["image_id"], []).append(annotation)
  rle = [i for i, a in by_image.items() if any(isinstance(x["segmentation"], dict) for x in a)]
  plain = [i for i, a in by_image.items() if i not in set(rle)]
  keep = set(rle[:10] + plain[:10])
  root = tmp_path / "coco_subset"
  (root / "images").mkdir(parents=True)
  images = [image for image in data["images"] if image["id"] in keep]
  for image in images:
    shutil.copy(os.path.join(source, "images", image["file_name"]), root / "images")
  write_coco(root, images, [a for a in data["annotations"] if a["image_id"] in keep])
  splits = build(root, tmp_path / "tfds", capsys)
  folders = {
    {"val": "validation"}.get(name, name): coco.CocoInstances(str(root), split_name=name)
    for name in coco.find_splits(str(root))
  }
  assert splits == {split: len(folder) for split, folder in folders.items()}
  assert sum(splits.values()) == len(keep) - sum(f.num_skipped for f in folders.values())
  for split in splits:
    built = sources.make_source(f"coco:tfds:{tmp_path / 'tfds'}/coco_instances", split).coco
    for index in range(len(built)):
      assert_same_items(built[index], folders[split][index])
  on_folder = sources.make_source(f"coco_splice:{root}", "train", image_size=128, seed=0)
  on_built = sources.make_source(
    f"coco_splice:tfds:{tmp_path / 'tfds'}/coco_instances", "train", image_size=128, seed=0
  )
  for index in range(3):
    assert_same_samples(on_built[index], on_folder[index])


def test_recipes_come_from_the_data_config(coco_tree):
  """data.object_jitter / data.instance_forgery reach the sources (a config override changes the
  forgeries); an unknown key is an error naming it."""
  from miml_jax import config as config_lib

  config = config_lib.load_config(
    os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")
  )
  config_lib.apply_overrides(
    config,
    [
      "data.image_size=64",
      "data.instance_forgery.min_area=9",
      "data.object_jitter.enlarge_ratio=0.25",
    ],
  )
  root, _ = coco_tree
  spec = f"coco:{root}+coco_splice:{root}"
  mixture = sources.source_from_config(spec, "train", config.data)
  (_, jitter, _), (_, splice, _) = mixture.parts
  assert jitter.transform.config.enlarge_ratio == 0.25
  assert splice.config.min_area == 9 and splice.config.scale_range == (0.75, 1.25)
  default = sources.make_source(spec, "train", image_size=64)
  assert default.parts[1][1].config == InstanceForgeryConfig()
  with config.unlocked():
    config.data.instance_forgery.bogus = 1
  with pytest.raises(UserInputError, match="instance_forgery.bogus: unknown key"):
    sources.source_from_config(spec, "train", config.data)


def test_feathered_paste_blends_by_the_distance_to_the_border():
  host, host_objects, donor, donor_objects = host_and_objects()
  cfg = InstanceForgeryConfig(min_area=64, occlude_prob=0.0, feather_prob=1.0, feather_width=(4, 4))
  result = splices(cfg, 10, occluders=False)[0]
  patch, hard = instance_forgery.cut_object(
    donor, donor_objects[result.object_index], result.scale, result.flip
  )
  # The alpha, stated directly: Euclidean distance from each object pixel to the nearest pixel
  # outside the object (the box's surround counts as outside), over the feather width.
  inside = np.argwhere(hard)
  outside = np.argwhere(~np.pad(hard, 1)) - 1
  distance = np.sqrt(((inside[:, None] - outside[None]) ** 2).sum(-1)).min(1)
  alpha = np.zeros(hard.shape, np.float32)
  alpha[tuple(inside.T)] = np.minimum(distance / 4.0, 1.0)
  canvas = np.zeros(host.shape[:2], np.float32)
  ys, xs = inside[:, 0] + result.y, inside[:, 1] + result.x
  keep = (ys >= 0) & (ys < host.shape[0]) & (xs >= 0) & (xs < host.shape[1])
  canvas[ys[keep], xs[keep]] = alpha[tuple(inside[keep].T)]
  np.testing.assert_allclose(result.mask / 255.0, canvas, atol=0.5 / 255 + 1e-6)
  full = np.zeros(host.shape, np.float32)
  full[ys[keep], xs[keep]] = patch[tuple(inside[keep].T)]
  expected = np.rint(host * (1 - canvas[..., None]) + full * canvas[..., None])
  np.testing.assert_array_equal(result.image, expected.astype(np.uint8))
  # The half-blended ring is ignored by the label rule; the object's core is tampered.
  label = decode_label(result.mask)
  assert (label[canvas == 0] == 0).all() and (label[canvas == 1] == 1).all()
  ring = (canvas > 0) & (canvas < 0.75)  # 1 to 2 px inside the border at width 4
  assert ring.any() and (label[ring] == 255).all()


def test_colour_match_moves_the_patch_statistics_to_the_host():
  rng = np.random.default_rng(0)
  host = rng.normal((60, 120, 90), (10, 20, 5), (40, 40, 3)).clip(0, 255).astype(np.uint8)
  patch = rng.normal((180, 100, 140), (25, 8, 15), (20, 16, 3)).clip(0, 255).astype(np.uint8)
  alpha = np.ones((20, 16), bool)
  alpha[:3] = False
  region = host[8:28, 10:26][alpha].astype(np.float64)
  moved = instance_forgery._match_colour(patch, alpha, host, 10, 8, 1.0)[alpha].astype(np.float64)
  np.testing.assert_allclose(moved.mean(0), region.mean(0), atol=0.6)
  np.testing.assert_allclose(moved.std(0), region.std(0), rtol=0.03)
  same = instance_forgery._match_colour(patch, alpha, host, 10, 8, 0.0)
  np.testing.assert_array_equal(same, patch)


def test_donor_traces_keep_the_mask_exactly_the_changed_pixels():
  host, host_objects, donor, donor_objects = host_and_objects()
  cfg = InstanceForgeryConfig(
    min_area=64,
    rotation_range=30.0,
    blur_prob=1.0,
    noise_prob=1.0,
    donor_jpeg_prob=1.0,
    colour_match_prob=0.0,
  )
  made = splices(cfg, 12)
  assert len(made) >= 8
  plain = InstanceForgeryConfig(min_area=64)
  for result in made:
    mask = result.mask > 0
    assert set(np.unique(result.mask)) <= {0, 255}
    np.testing.assert_array_equal(mask, (result.image != host).any(-1))
  # Rotated, blurred, noisier, recompressed: not the plain paste of the same draw.
  again = instance_forgery.splice(
    host, donor, donor_objects, np.random.default_rng(0), plain, host_instances=host_objects
  )
  assert again is not None and again.image.tobytes() != made[0].image.tobytes()


def test_native_resolution_crops_on_the_jpeg_grid_and_untouched_crops(coco_tree):
  root, _ = coco_tree
  folder = coco.CocoInstances(str(root))
  cfg = InstanceForgeryConfig(native_resolution=True, authentic_prob=1.0)
  source = instance_forgery.InstanceForgerySource(
    folder, "splice", crop_size=32, seed=0, split_id=0, config=cfg
  )
  for index in range(len(source)):
    sample = source[index]
    assert sample["kind"] == "authentic" and not sample["mask"].any()
    photo = folder[index]["image"]
    found = [
      (y, x)
      for y in range(HEIGHT - 31)
      for x in range(WIDTH - 31)
      if (photo[y : y + 32, x : x + 32] == sample["image"]).all()
    ]
    assert found and all(y % 8 == 0 and x % 8 == 0 for y, x in found)
  assert source.fallback_count == 0
  # With forgeries on: the host pixels outside the paste are the photo's own, unresampled.
  forged = instance_forgery.InstanceForgerySource(
    folder,
    "splice",
    crop_size=48,
    seed=0,
    split_id=0,
    config=InstanceForgeryConfig(native_resolution=True, min_area=64),
  )[0]
  assert forged["kind"] == "splice"
  photo = folder[0]["image"]
  untouched = forged["mask"] == 0
  matches = [
    (y, x)
    for y in range(0, HEIGHT - 47, 8)
    for x in range(0, WIDTH - 47, 8)
    if (photo[y : y + 48, x : x + 48][untouched] == forged["image"][untouched]).all()
  ]
  assert matches


def test_host_jpeg_compresses_edited_hosts_only(coco_tree):
  root, _ = coco_tree
  folder = coco.CocoInstances(str(root))

  def source(**cfg):
    config = InstanceForgeryConfig(native_resolution=True, min_area=64, **cfg)
    return instance_forgery.InstanceForgerySource(
      folder, "splice", crop_size=48, seed=0, split_id=0, config=config
    )

  plain, camera = source()[0], source(host_jpeg_prob=1.0, host_jpeg_quality=(50, 50))[0]
  assert plain["kind"] == camera["kind"] == "splice"
  np.testing.assert_array_equal(plain["mask"], camera["mask"])  # The same draws otherwise.
  # Outside the paste the edited host is the photo's crop through one JPEG at quality 50.
  photo, untouched = folder[0]["image"], camera["mask"] == 0
  assert not (camera["image"][untouched] == plain["image"][untouched]).all()
  saved = [
    transforms.jpeg_roundtrip(np.ascontiguousarray(photo[y : y + 48, x : x + 48]), 50)
    for y in range(0, HEIGHT - 47, 8)
    for x in range(0, WIDTH - 47, 8)
  ]
  assert any((s[untouched] == camera["image"][untouched]).all() for s in saved)
  # Untouched crops are left alone.
  left = source(host_jpeg_prob=1.0, authentic_prob=1.0)[0]
  np.testing.assert_array_equal(left["image"], source(authentic_prob=1.0)[0]["image"])
  with pytest.raises(UserInputError, match="host_jpeg_quality"):
    InstanceForgeryConfig(host_jpeg_quality=(0, 90))
  with pytest.raises(UserInputError, match="coco_sdg: data.instance_forgery.host_jpeg_prob"):
    sources.make_source(
      f"coco_sdg:{root}", "train", image_size=32, instance_forgery={"host_jpeg_prob": 0.5}
    )


def test_realism_switches_are_checked_and_sdg_refuses_rotation(coco_tree):
  root, _ = coco_tree
  for key, value in (("feather_prob", 1.5), ("noise_sigma", (3.0, 1.0)), ("rotation_range", -1)):
    with pytest.raises(UserInputError, match=f"instance_forgery.{key}"):
      InstanceForgeryConfig(**{key: value})
  with pytest.raises(UserInputError, match="donor_jpeg_quality"):
    InstanceForgeryConfig(donor_jpeg_quality=(90, 101))
  with pytest.raises(UserInputError, match="coco_sdg: data.instance_forgery.rotation_range"):
    sources.make_source(
      f"coco_sdg:{root}", "train", image_size=32, instance_forgery={"rotation_range": 10.0}
    )
