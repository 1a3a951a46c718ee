"""The task contract (miml_jax/tasks/): pair segmentation and pair classification train,
checkpoint, resume exactly, evaluate and predict through the same public commands as Web-IML,
on data the tests generate; and the pieces every task shares."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from miml_jax import cli, io, tasks
from miml_jax import config as config_lib
from miml_jax.input import pairs, transforms
from test_instance_forgery import ellipse, noise, polygon, write_coco

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
  """Five 96x96 noise photos with split fields (three train, two val), each with two large
  objects, as coco_spg: reads them."""
  root = tmp_path_factory.mktemp("coco") / "coco"
  (root / "images").mkdir(parents=True)
  images, annotations = [], []
  for k in range(5):
    io.write_image(str(root / "images" / f"{k}.png"), noise(96, 96, 20 + k, 40, 200))
    images.append(
      {
        "id": k,
        "file_name": f"{k}.png",
        "height": 96,
        "width": 96,
        "split": "train2017" if k < 3 else "val2017",
      }
    )
    from miml_jax.input import coco

    runs = coco.mask_to_runs(ellipse(96, 96, (60 - 3 * k, 60), (18, 14), 25 * k)).tolist()
    for number, segmentation in enumerate(
      [[polygon(8 + 2 * k, 8, 34, 30)], {"size": [96, 96], "counts": runs}]
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


def _write_pairs(root, count, seed):
  """CAAA-layout pair folders: <id>/0.png authentic, <id>/1.png forged (a bright square)."""
  rng = np.random.default_rng(seed)
  for k in range(count):
    authentic = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    forged = authentic.copy()
    forged[10:30, 20:44] = 255
    folder = root / f"p{k}"
    folder.mkdir(parents=True)
    io.write_image(str(folder / "0.png"), authentic)
    io.write_image(str(folder / "1.png"), forged)
  return root


# ---- pieces every task shares ----------------------------------------------------------------
def test_one_geometric_draw_moves_every_field_alike():
  """augment_fields crops, flips and turns all fields of an example together (photometric
  draws off, two identical images stay identical and the mask follows them), and for a single
  image and mask it is train_augment, draw for draw."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (90, 110, 3), dtype=np.uint8)
  mask = np.zeros((90, 110), np.uint8)
  mask[20:50, 30:70] = 255
  marked = image.copy()
  marked[mask > 0] = 0  # The mask region is black in the 'forged' image.
  cfg = transforms.AugmentConfig(
    crop_size=64, resize_range=(1.0, 1.3), jpeg_prob=0.0, rgb_shift_prob=0.0
  )
  kinds = {"authentic": "image", "forged": "image", "mask": "mask"}
  for seed in range(8):
    out = transforms.augment_fields(
      {"authentic": image, "forged": marked, "mask": mask}, kinds, np.random.default_rng(seed), cfg
    )
    assert out["authentic"].shape == out["forged"].shape == (64, 64, 3)
    changed = np.any(out["authentic"] != out["forged"], axis=-1)
    # Nearest-neighbour mask vs bilinear images: they agree away from the region's edge.
    inner = out["mask"] == 1
    assert changed[inner].mean() > 0.95 and (~changed[out["mask"] == 0]).mean() > 0.9
  a = transforms.train_augment(
    image, mask, np.random.default_rng(5), transforms.AugmentConfig(crop_size=64)
  )
  b = transforms.augment_fields(
    {"image": image, "mask": mask},
    {"image": "image", "mask": "mask"},
    np.random.default_rng(5),
    transforms.AugmentConfig(crop_size=64),
  )
  np.testing.assert_array_equal(a[0], b["image"])
  np.testing.assert_array_equal(a[1], b["mask"])


def test_task_comes_from_the_config_or_the_model():
  config = config_lib.load_config(os.path.join(EXPERIMENTS, "quickstart.py"))
  assert tasks.task_name(config) == "segmentation"
  with config.unlocked():
    del config["task"]
  assert tasks.task_name(config) == "segmentation"  # web_iml's registered task
  config = config_lib.load_config(os.path.join(EXPERIMENTS, "pair_classification.py:tiny"))
  with config.unlocked():
    del config["task"]
  assert tasks.task_name(config) == "pair_classification"
  with config.unlocked():
    config.task = "captioning"
  with pytest.raises(Exception, match="task: 'captioning' is not one of"):
    tasks.task_name(config)


def test_a_source_without_the_tasks_fields_is_a_one_line_error(tmp_path, capsys):
  code, _, err = run(
    capsys,
    "train",
    "--config",
    os.path.join(EXPERIMENTS, "pair_segmentation.py:tiny"),
    "--workdir",
    tmp_path / "w",
    "--config.data.train=synthetic:8",
  )
  assert code == 2
  assert err.startswith(
    "error: data.train=synthetic:8: task 'pair_segmentation' needs the "
    "field(s) authentic, forged, mask"
  )
  assert len(err.strip().splitlines()) == 1


def test_random_batches_follow_each_tasks_example_batch():
  for spec in ("quickstart.py", "pair_segmentation.py:tiny", "pair_classification.py:tiny"):
    config = tasks.validate_config(config_lib.load_config(os.path.join(EXPERIMENTS, spec)))
    task = tasks.build(config)
    batch = task.random_batch(np.random.default_rng(0), 2, 32)
    specs = task.example_batch(2, 32)
    assert set(batch) == set(specs)
    for key, value in batch.items():
      assert value.shape == specs[key].shape and value.dtype == specs[key].dtype, key


# ---- pair segmentation ------------------------------------------------------------------------
PAIR_SEG = os.path.join(EXPERIMENTS, "pair_segmentation.py:tiny")


@pytest.fixture(scope="module")
def pair_seg_run(coco_root, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ps") / "w"
  code = cli.main(
    [
      "train",
      "--config",
      PAIR_SEG,
      "--workdir",
      str(workdir),
      "--json",
      f"--config.data.train=coco_spg:{coco_root}",
      f"--config.data.validation=coco_spg:{coco_root}",
      "--config.train.steps=4",
      "--config.train.eval_every=0",
    ]
  )
  assert code == 0
  return workdir


def _params(workdir, step):
  from miml_jax import checkpoint

  return checkpoint.load_model(str(workdir), step)[2]


def _assert_resumes_exactly(run_dir, tmp_path, capsys, *argv):
  workdir = tmp_path / "resumed"
  shutil.copytree(run_dir, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = run(capsys, "train", *argv, "--workdir", workdir)
  assert code == 0 and "resumed from" in err
  for a, b in zip(
    jax.tree_util.tree_leaves(_params(workdir, 4)),
    jax.tree_util.tree_leaves(_params(run_dir, 4)),
    strict=True,
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pair_segmentation_trains_checkpoints_and_resumes(
  pair_seg_run, coco_root, tmp_path, capsys
):
  assert sorted(os.listdir(pair_seg_run / "checkpoints")) == ["2", "4"]
  metrics = json.loads((pair_seg_run / "metrics.json").read_text())
  assert metrics["step"] == 4 and metrics["summary"]["num_images"] > 0
  assert os.path.isfile(pair_seg_run / "predictions.png")
  history = [json.loads(line) for line in (pair_seg_run / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
  # The 9-channel stem: authentic, forged and their difference.
  params = _params(pair_seg_run, 4)["params"]
  assert params["backbone"]["downsample_layers_0_0"]["kernel"].shape[2] == 9
  _assert_resumes_exactly(
    pair_seg_run,
    tmp_path,
    capsys,
    "--config",
    PAIR_SEG,
    f"--config.data.train=coco_spg:{coco_root}",
    f"--config.data.validation=coco_spg:{coco_root}",
    "--config.train.steps=4",
    "--config.train.eval_every=0",
  )


def test_pair_segmentation_eval_and_predict(pair_seg_run, tmp_path, capsys):
  pairs_root = _write_pairs(tmp_path / "pairs", 3, seed=1)
  # Masks for two of the three pairs: eval scores the forged image's map against them.
  for k in range(2):
    mask = np.zeros((64, 80), np.uint8)
    mask[10:30, 20:44] = 255
    io.write_image(str(pairs_root / f"p{k}" / "mask.png"), mask)
  code, out, _ = run(
    capsys,
    "eval",
    "--checkpoint",
    pair_seg_run,
    "--json",
    "--data",
    f"pairs:{pairs_root}",
    "--out",
    tmp_path / "e",
  )
  assert code == 0, out
  result = json.loads(out)
  assert result["summary"]["num_images"] == 2  # The pair without a mask counts as authentic.
  assert 0.0 <= result["summary"]["iou"] <= 1.0 and "fixed_0.5" in result["conventions"]
  assert os.path.isfile(tmp_path / "e" / "report.md")
  # Robustness sweeps degrade the forged image, the one the map belongs to.
  code, out, _ = run(
    capsys,
    "eval",
    "--checkpoint",
    pair_seg_run,
    "--json",
    "--data",
    f"pairs:{pairs_root}",
    "--perturb",
    "jpeg:70",
    "--conventions",
    "none",
  )
  assert code == 0
  assert [(r["kind"], r["value"]) for r in json.loads(out)["robustness"]] == [
    ("jpeg", None),
    ("jpeg", 70),
  ]
  # predict: a folder of pair folders, and one pair folder itself.
  code, out, _ = run(
    capsys, "predict", pairs_root, "--checkpoint", pair_seg_run, "--out", tmp_path / "p", "--json"
  )
  assert code == 0
  records = json.loads(out)["predictions"]
  assert [r["image"] for r in records] == ["p0", "p1", "p2"]
  heatmap = io.read_image(records[0]["files"]["heatmap"])
  assert heatmap.shape[:2] == (64, 80)  # The forged image's own size.
  code, out, _ = run(
    capsys,
    "predict",
    pairs_root / "p1",
    "--checkpoint",
    pair_seg_run,
    "--out",
    tmp_path / "p1",
    "--json",
  )
  assert code == 0 and [r["image"] for r in json.loads(out)["predictions"]] == ["p1"]
  # A pair model refuses single images with one line.
  io.write_image(str(tmp_path / "one.png"), noise(32, 32, 0))
  code, _, err = run(
    capsys, "predict", tmp_path / "one.png", "--checkpoint", pair_seg_run, "--out", tmp_path / "x"
  )
  assert code == 2 and "not a folder; a pair model predicts pair folders" in err


# ---- pair classification ----------------------------------------------------------------------
PAIR_CLS = os.path.join(EXPERIMENTS, "pair_classification.py:tiny")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  for k in range(24):
    io.write_image(str(root / f"{k:02d}.png"), noise(72, 88, 100 + k, 30, 220))
  return root


@pytest.fixture(scope="module")
def pair_cls_run(photos, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pc") / "w"
  code = cli.main(
    [
      "train",
      "--config",
      PAIR_CLS,
      "--workdir",
      str(workdir),
      "--json",
      f"--config.data.train=pair_synth:{photos}",
      f"--config.data.validation=pair_synth:{photos}",
      "--config.data.pair_synth.holdout=0.25",
      "--config.train.steps=4",
      "--config.train.eval_every=0",
    ]
  )
  assert code == 0
  return workdir


def test_pair_classification_trains_checkpoints_and_resumes(pair_cls_run, photos, tmp_path, capsys):
  assert sorted(os.listdir(pair_cls_run / "checkpoints")) == ["2", "4"]
  metrics = json.loads((pair_cls_run / "metrics.json").read_text())
  summary = metrics["summary"]
  assert metrics["step"] == 4 and summary["num_pairs"] > 0
  assert 0.0 <= summary["route_accuracy"] <= 1.0
  assert sum(summary["route_counts"].values()) == summary["num_pairs"]
  # The best checkpoint is chosen by the task's own headline.
  assert os.listdir(pair_cls_run / "best") == ["4"]
  _assert_resumes_exactly(
    pair_cls_run,
    tmp_path,
    capsys,
    "--config",
    PAIR_CLS,
    f"--config.data.train=pair_synth:{photos}",
    f"--config.data.validation=pair_synth:{photos}",
    "--config.data.pair_synth.holdout=0.25",
    "--config.train.steps=4",
    "--config.train.eval_every=0",
  )


def test_pair_classification_eval_and_predict(pair_cls_run, photos, tmp_path, capsys):
  code, out, _ = run(
    capsys, "eval", "--checkpoint", pair_cls_run, "--json", "--out", tmp_path / "e"
  )
  assert code == 0
  result = json.loads(out)
  assert set(result["summary"]) >= {"route_accuracy", "same_source_accuracy", "box_iou"}
  assert os.path.isfile(tmp_path / "e" / "per_pair.csv")
  code, _, err = run(capsys, "eval", "--checkpoint", pair_cls_run, "--perturb", "jpeg:50")
  assert code == 2 and "predicts none" in err
  pairs_root = _write_pairs(tmp_path / "pairs", 2, seed=3)
  code, out, _ = run(
    capsys, "predict", pairs_root, "--checkpoint", pair_cls_run, "--out", tmp_path / "p", "--json"
  )
  assert code == 0
  records = json.loads(out)["predictions"]
  assert [r["pair"] for r in records] == ["p0", "p1"]
  for record in records:
    assert record["route"] in ("spg", "spg_unaligned", "sdg")
    assert 0 <= record["same_source"] <= 1 and len(record["box"]) == 4
  stored = json.loads((tmp_path / "p" / "predictions.json").read_text())
  assert stored == records


def test_pair_synth_holds_out_photos(photos):
  train = pairs.PairSynthSource(
    str(photos), 32, 0, 0, pairs.PairSynthConfig(holdout=0.25), holdout_split=False
  )
  val = pairs.PairSynthSource(
    str(photos), 32, 0, 1, pairs.PairSynthConfig(holdout=0.25), holdout_split=True
  )
  assert not set(train.photos) & set(val.photos)
  assert len(train.photos) + len(val.photos) == 24 and len(val.photos) >= 2


def test_pair_classification_flips_move_the_box_with_the_images():
  """A crop at `box` of the authentic image stays at the moved box after the joint flips and
  turns: checked by cutting the transformed authentic image at the transformed box."""
  from miml_jax.tasks import pair_classification

  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
  box = np.asarray([0.25, 0.5, 0.75, 1.0], np.float32)  # x 10..30, y 20..40
  cfg = transforms.AugmentConfig(crop_size=40, hflip=0.5, vflip=0.5, rot90=0.5)
  want = image[20:40, 10:30]
  seen = set()
  for seed in range(16):
    images, moved = pair_classification._flip_and_turn(
      {"authentic": image, "forged": image}, box, np.random.default_rng(seed), cfg
    )
    x0, y0, x1, y1 = np.round(moved * 40).astype(int)
    crop = images["authentic"][y0:y1, x0:x1]
    # The crop is the original region under some flip/turn: same pixels as a multiset.
    assert crop.shape[:2] in ((20, 20),)
    assert sorted(map(tuple, crop.reshape(-1, 3))) == sorted(map(tuple, want.reshape(-1, 3)))
    seen.add(tuple(moved))
  assert len(seen) > 3
