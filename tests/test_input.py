"""Input side: label decoding, augmentations, the grain pipeline's determinism and resume,
the folder source's errors, and evaluation batching."""

import json
import os

import numpy as np
import pytest

from miml_jax import io
from miml_jax.errors import UserInputError
from miml_jax.input import pipeline, sources, transforms
from miml_jax.tasks import segmentation


class ArraySource:
  """A tiny in-memory source with distinct images, to check what the pipeline delivers."""

  def __init__(self, n=10, size=40):
    rng = np.random.default_rng(0)
    self.items = [
      {
        "image": rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8),
        "mask": (rng.random((size, size + 8)) > 0.7).astype(np.uint8) * 255,
        "id": str(i),
        "is_jpeg": False,
      }
      for i in range(n)
    ]

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


def test_decode_label_soft_band():
  mask = np.array([[0, 7, 8, 100, 192, 193, 255]], np.uint8)
  np.testing.assert_array_equal(transforms.decode_label(mask), [[0, 0, 255, 255, 255, 1, 1]])


def test_train_augment_shapes_and_determinism():
  sample = ArraySource(1)[0]
  cfg = transforms.AugmentConfig(crop_size=32, jpeg_prob=1.0, rgb_shift_prob=1.0)
  a = transforms.train_augment(sample["image"], sample["mask"], np.random.default_rng(3), cfg)
  b = transforms.train_augment(sample["image"], sample["mask"], np.random.default_rng(3), cfg)
  assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
  assert a[1].shape == (32, 32) and set(np.unique(a[1])) <= {0, 1}
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])


def test_geometric_augment_keeps_image_and_mask_aligned():
  # With a mask that equals a colour channel, every flip/rotation/crop must keep them equal.
  rng = np.random.default_rng(1)
  image = np.zeros((48, 48, 3), np.uint8)
  image[..., 0] = (rng.random((48, 48)) > 0.5) * 255
  # resize_range 1.5 x crop 32 = 48, the image size: no resampling, only crops and turns.
  cfg = transforms.AugmentConfig(
    crop_size=32,
    resize_range=(1.5, 1.5),
    jpeg_prob=0.0,
    rgb_shift_prob=0.0,
    hflip=0.5,
    vflip=0.5,
    rot90=0.5,
  )
  for seed in range(8):
    out, label = transforms.train_augment(
      image, image[..., 0].copy(), np.random.default_rng(seed), cfg
    )
    np.testing.assert_array_equal(out[..., 0] // 255, label)


def test_untouched_examples_take_their_own_jpeg_probability():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  untouched = np.zeros((32, 32), np.uint8)
  edited = untouched.copy()
  edited[4:10, 4:10] = 255
  plain = dict(crop_size=32, resize_range=(1.0, 1.0), hflip=0.0, vflip=0.0, rot90=0.0)
  plain.update(jpeg_prob=1.0, rgb_shift_prob=0.0)
  cfg = transforms.AugmentConfig(**plain, untouched_jpeg_prob=0.0)

  def out(mask, cfg, seed=0):
    return transforms.train_augment(image, mask, np.random.default_rng(seed), cfg)[0]

  # A photo nobody edited keeps its pixels; an edited one is re-saved, as with jpeg_prob alone.
  np.testing.assert_array_equal(out(untouched, cfg), image)
  assert not np.array_equal(out(edited, cfg), image)
  default = transforms.AugmentConfig(**plain)
  np.testing.assert_array_equal(out(edited, cfg), out(edited, default))
  assert not np.array_equal(out(untouched, default), image)
  # A soft (feathered) mark above the authentic band counts as an edit.
  faint = untouched.copy()
  faint[0, 0] = 9
  assert not np.array_equal(out(faint, cfg), image)
  with pytest.raises(Exception, match="untouched_jpeg_prob"):
    transforms.AugmentConfig.from_config({"untouched_jpeg_prob": 1.5})


def _batches(it, n):
  return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_and_resumes_exactly():
  source = ArraySource(10)
  cfg = transforms.AugmentConfig(crop_size=32)
  make = lambda start=0: iter(
    pipeline.train_dataset(
      source, batch_size=3, transform=segmentation.train_transform(cfg), seed=7, start_step=start
    )
  )
  reference = _batches(make(), 8)  # 24 elements: past two epochs, so reshuffles are covered.
  resumed = _batches(make(), 3) + _batches(make(start=3), 5)
  for got, want in zip(resumed, reference):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])
  other_seed = next(
    iter(
      pipeline.train_dataset(
        source, batch_size=3, transform=segmentation.train_transform(cfg), seed=8
      )
    )
  )
  assert not np.array_equal(other_seed["image"], reference[0]["image"])


@pytest.mark.parametrize("processes", [2, 3])
def test_global_batches_do_not_depend_on_the_process_count(processes):
  """P processes (resumed or not) together see exactly the global batches one process sees:
  process p's rows are rows [p*B/P, (p+1)*B/P) of each."""
  source = ArraySource(7)
  cfg = transforms.AugmentConfig(crop_size=32)
  one = _batches(
    iter(
      pipeline.train_dataset(
        source, batch_size=6, transform=segmentation.train_transform(cfg), seed=1
      )
    ),
    5,
  )
  hosts = [
    iter(
      pipeline.train_dataset(
        source,
        batch_size=6,
        transform=segmentation.train_transform(cfg),
        seed=1,
        process_index=p,
        process_count=processes,
        start_step=2,
      )
    )
    for p in range(processes)
  ]
  for want in one[2:]:
    parts = [next(h) for h in hosts]
    assert all(len(part["image"]) == 6 // processes for part in parts)
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([part[key] for part in parts]), want[key])
  with pytest.raises(ValueError, match="does not split over 4 processes"):
    pipeline.train_dataset(
      source, batch_size=6, transform=segmentation.train_transform(cfg), seed=1, process_count=4
    )


def test_eval_batches_pad_group_and_fill():
  source = ArraySource(5, size=40)  # 40 x 48 -> padded to 64 x 64
  batches = list(pipeline.eval_batches(source, batch_size=2))
  assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
  assert all(b["image"].shape == (2, 64, 64, 3) for b in batches)
  assert [s["index"] for b in batches for s in b["samples"]] == list(range(5))
  np.testing.assert_array_equal(batches[0]["image"][0, :40, :48], source[0]["image"])


def test_eval_batches_bound_what_waits_for_a_full_batch():
  """Every image its own size: part-filled batches go out instead of the data piling up."""
  reads = []

  class Sizes:
    def __len__(self):
      return 12

    def __getitem__(self, index):
      reads.append(index)
      return {"image": np.zeros((32 * (index + 1), 32, 3), np.uint8), "mask": None}

  seen = []
  for batch in pipeline.eval_batches(Sizes(), batch_size=2, max_pending=3):
    seen += [s["index"] for s in batch["samples"]]
    assert batch["valid"].tolist() == [True, False]
    assert len(reads) - len(seen) <= 3  # Examples read but not yet given out.
  assert sorted(seen) == list(range(12))


def _write_layout(root, n=2, size=(20, 24)):
  os.makedirs(root / "imgs")
  os.makedirs(root / "masks")
  for i in range(n):
    io.write_image(str(root / "imgs" / f"{i}.jpg"), np.full((*size, 3), 100, np.uint8))
    io.write_image(str(root / "masks" / f"{i}.png"), np.zeros(size, np.uint8))


def test_folder_source_reads_miml_layout(tmp_path):
  _write_layout(tmp_path)
  source = sources.make_source(f"folder:{tmp_path}", "validation")
  assert len(source) == 2
  item = source[1]
  assert item["image"].shape == (20, 24, 3) and item["mask"].shape == (20, 24)
  assert item["is_jpeg"] and item["id"] == os.path.join("imgs", "1.jpg")


def test_benco_list_names_images_by_their_path(tmp_path):
  """Pairs laid out as <pair>/1.jpg share a basename; their ids must still tell them apart."""
  entries = []
  for pair in ("p0", "p1"):
    os.makedirs(tmp_path / pair)
    io.write_image(str(tmp_path / pair / "1.jpg"), np.full((8, 8, 3), 90, np.uint8))
    io.write_image(str(tmp_path / pair / "mask.png"), np.zeros((8, 8), np.uint8))
    entries += [[f"{pair}/1.jpg", f"{pair}/mask.png"], [f"{pair}/1.jpg", "Negative"]]
  (tmp_path / "list.json").write_text(json.dumps(entries))
  source = sources.make_source(f"benco:{tmp_path / 'list.json'}", "validation")
  ids = [source[i]["id"] for i in range(len(source))]
  assert ids == [os.path.join(p, "1.jpg") for p in ("p0", "p0", "p1", "p1")]


def test_folder_source_errors_name_the_file(tmp_path):
  with pytest.raises(UserInputError, match="imgs/ and a masks/"):
    sources.make_source(f"folder:{tmp_path}", "train")
  os.makedirs(tmp_path / "imgs")
  with pytest.raises(UserInputError, match="no images"):
    sources.make_source(f"folder:{tmp_path}", "train")
  _write_layout(tmp_path / "a")
  os.remove(tmp_path / "a" / "masks" / "1.png")
  with pytest.raises(UserInputError, match=r"1\.jpg: no mask"):
    sources.make_source(f"folder:{tmp_path / 'a'}", "train")
  _write_layout(tmp_path / "b")
  io.write_image(str(tmp_path / "b" / "masks" / "0.png"), np.zeros((5, 5), np.uint8))
  source = sources.make_source(f"folder:{tmp_path / 'b'}", "train")
  with pytest.raises(UserInputError, match=r"masks/0\.png: mask is 5x5 but its image"):
    source[0]
  (tmp_path / "b" / "imgs" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  with pytest.raises(UserInputError, match=r"imgs/1\.jpg: not a readable image"):
    source[1]


def _bad_layout(root):
  """5 examples: 0 a wrong-size mask, 2 a truncated JPEG, 4 no mask; 1 and 3 are fine."""
  _write_layout(root, n=5, size=(32, 40))
  io.write_image(str(root / "masks" / "0.png"), np.zeros((5, 5), np.uint8))
  (root / "imgs" / "2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  os.remove(root / "masks" / "4.png")


def test_skip_mode_replaces_in_training_and_drops_in_evaluation(tmp_path):
  _bad_layout(tmp_path)
  with pytest.raises(UserInputError, match=r"4\.jpg: no mask"):
    sources.make_source(f"folder:{tmp_path}", "train")
  with pytest.raises(UserInputError, match="data.on_error='maybe'"):
    sources.make_source(f"folder:{tmp_path}", "train", on_error="maybe")
  train = sources.make_source(f"folder:{tmp_path}", "train", on_error="skip", for_training=True)
  assert len(train) == 4 and [m.split(":")[1] for m in train.skipped] == [
    " no mask " + str(tmp_path / "masks" / "4") + ".png"
  ]
  # Index 0 (bad mask) is replaced by 1; 2 (truncated) by 3; the replaced files are named.
  assert train[0]["id"] == "imgs/1.jpg" and "0.png: mask is 5x5" in train[0]["skipped"]
  assert train[2]["id"] == "imgs/3.jpg" and "2.jpg: not a readable image" in train[2]["skipped"]
  assert train[1]["skipped"] == ""
  cfg = transforms.AugmentConfig(crop_size=16)
  batch = next(
    iter(
      pipeline.train_dataset(
        train, batch_size=4, transform=segmentation.train_transform(cfg), seed=0
      )
    )
  )
  assert sum(bool(r) for r in batch["skipped"]) == 2  # One epoch: both bad files, once each.
  evaluation = sources.make_source(f"folder:{tmp_path}", "validation", on_error="skip")
  kept = [b["samples"] for b in pipeline.eval_batches(evaluation, batch_size=2)]
  assert [s["id"] for batch in kept for s in batch] == ["imgs/1.jpg", "imgs/3.jpg"]
  assert len(evaluation.skipped) == 3  # No mask (at listing), bad mask, truncated image.


def test_unknown_source_kind():
  with pytest.raises(UserInputError, match="unknown kind 'hdf5'"):
    sources.make_source("hdf5:casia", "train")


def test_mixture_repeats_each_source_per_epoch():
  """'a*2+b': one epoch holds every example of a twice and of b once, shuffled together."""
  a, b = ArraySource(3, size=16), ArraySource(2, size=16)
  names = {}
  for name, source in (("a", a), ("b", b)):
    for i, item in enumerate(source.items):  # One flat colour per image identifies its crops.
      value = 20 * len(names) + 10
      item["image"] = np.full_like(item["image"], value)
      names[value] = f"{name}{i}"
  mixture = sources.MixtureSource([("a", a, 2), ("b", b, 1)])
  assert len(mixture) == 8 and mixture[7]["id"] == "b/1" and mixture[4]["id"] == "a/1"
  cfg = transforms.AugmentConfig(
    crop_size=16, resize_range=(1.0, 1.0), hflip=0, vflip=0, rot90=0, jpeg_prob=0, rgb_shift_prob=0
  )
  stream = iter(
    pipeline.train_dataset(
      mixture, batch_size=4, transform=segmentation.train_transform(cfg), seed=3
    )
  )
  epoch = np.concatenate([next(stream)["image"] for _ in range(2)])  # 8 = one epoch
  counts = {}
  for crop in epoch:
    origin = names[int(crop[0, 0, 0])]
    counts[origin] = counts.get(origin, 0) + 1
  assert counts == {"a0": 2, "a1": 2, "a2": 2, "b0": 1, "b1": 1}


def test_mixture_spec_and_its_errors():
  mixture = sources.make_source("synthetic:5*3 + synthetic:4", "train", image_size=32)
  assert len(mixture) == 19 and mixture.describe() == "synthetic:5 (5 x 3) + synthetic:4 (4 x 1)"
  assert mixture[15]["id"].startswith("synthetic:4/")
  for spec, message in (
    ("synthetic*0", "cannot read 'synthetic\\*0'"),
    ("synthetic+", "cannot read ''"),
    ("synthetic*2+hdf5:x", "unknown kind 'hdf5'"),
  ):
    with pytest.raises(UserInputError, match=message):
      sources.make_source(spec, "train")
