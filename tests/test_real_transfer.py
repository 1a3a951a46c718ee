"""experiments/real_transfer.py: each ablation differs from the recipe in exactly the switches it
names; the tiny variant trains on generated COCO photos through `miml-jax train`; and
experiments/reports/transfer_table.py scores the run on a real-style set (tampered images with
masks and authentic negatives) once, and tabulates it."""

import json
import os
import sys

import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax import config as config_lib
from miml_jax.input.instance_forgery import InstanceForgeryConfig
from test_tasks import EXPERIMENTS, coco_root, noise  # noqa: F401 (a fixture)

CONFIG = os.path.join(EXPERIMENTS, "real_transfer.py")
sys.path.insert(0, os.path.join(EXPERIMENTS, "reports"))
import transfer_table  # noqa: E402


def _recipe(variant: str):
  config = config_lib.load_config(f"{CONFIG}:{variant}")
  forgery = InstanceForgeryConfig.from_config(config.data.instance_forgery)
  return config, forgery


def test_each_ablation_changes_only_what_it_names():
  base, base_forgery = _recipe("realistic")
  assert base_forgery.native_resolution and base_forgery.feather_prob > 0
  assert base.input.augment.jpeg_prob > 0 and base.input.augment.resize_range == (1.0, 1.0)
  expected = {
    "no_native": {"native_resolution"},
    "no_feather": {"feather_prob"},
    "no_colour_match": {"colour_match_prob"},
    "no_donor_traces": {"blur_prob", "noise_prob", "donor_jpeg_prob"},
    "no_resampling": {"scale_range", "rotation_range"},
    "no_authentic": {"authentic_prob"},
  }
  for variant, keys in expected.items():
    config, forgery = _recipe(variant)
    changed = {
      k for k in base.data.instance_forgery if getattr(forgery, k) != getattr(base_forgery, k)
    }
    assert changed == keys, variant
    assert config.data.train == base.data.train and config.model == base.model
  # hard_paste is the library's default recipe, with no final JPEG.
  hard, hard_forgery = _recipe("hard_paste")
  assert hard_forgery == InstanceForgeryConfig() and hard.input.augment.jpeg_prob == 0
  final, _ = _recipe("no_final_jpeg")
  assert final.input.augment.jpeg_prob == 0 and final.data == base.data
  mix, _ = _recipe("final_jpeg_mix")
  assert 0 < mix.input.augment.jpeg_prob < base.input.augment.jpeg_prob and mix.data == base.data
  assert "coco:" not in _recipe("no_jitter")[0].data.train
  no_splice = _recipe("no_splice")[0]
  assert no_splice.data.train.startswith("coco:") and "+" not in no_splice.data.train
  assert no_splice.data.validation == base.data.validation
  assert "coco_copymove" not in _recipe("no_copymove")[0].data.train
  camera, _ = _recipe("camera_negatives")
  assert camera.input.augment.untouched_jpeg_prob == 0 and camera.input.augment.jpeg_prob == 1
  assert camera.data == base.data and camera.loss == base.loss
  # dct_view is camera_negatives with the model's JPEG view, at every scale.
  dct, _ = _recipe("dct_view")
  assert dct.input == camera.input and dct.data == base.data and dct.loss == base.loss
  assert dct.model.dct_view.frequencies > 0 and "dct_view" not in camera.model
  assert {k: v for k, v in dct.model.to_dict().items() if k != "dct_view"} == base.model.to_dict()
  assert _recipe("dct_view:full")[0].model.dct_view == dct.model.dct_view
  double, double_forgery = _recipe("double_jpeg")
  assert double.model == dct.model and double.input.augment.jpeg_prob == 1.0
  assert double.input.augment.get("untouched_jpeg_prob") is None
  changed = {
    k for k in base.data.instance_forgery if getattr(double_forgery, k) != getattr(base_forgery, k)
  }
  assert changed == {"host_jpeg_prob"}  # at the default quality, 60-95
  detector, _ = _recipe("dct_detector")
  assert detector.model.dct_view.image_head > 0 and detector.data == double.data
  assert detector.input == double.input
  detect, _ = _recipe("map_detection")
  assert detect.loss.map_detection_weight > 0 and detect.data == base.data
  assert detect.input == base.input and detect.model == base.model
  assert _recipe("map_detection:full")[0].loss.map_detection_weight > 0
  wide, _ = _recipe("wide")
  assert wide.model.backbone.dims != base.model.backbone.dims and wide.data == base.data
  bayar, _ = _recipe("bayar")
  assert bayar.model.noise_view == "srm_bayar" and bayar.data == base.data
  assert _recipe("bayar:full")[0].model.noise_view == "srm_bayar"
  through, _ = _recipe("image_head_through")
  assert through.model.head.image_head_detach is False and through.data == base.data
  assert through.input == base.input and through.loss == base.loss
  assert "image_head_detach" not in base.model.head
  assert _recipe("image_head_through:full")[0].model.head.image_head_detach is False
  seeded, _ = _recipe("no_feather:seed1")
  assert seeded.seed == seeded.data.seed == 1
  full, full_forgery = _recipe("no_feather:full")
  assert full.model.backbone.preset == "base" and full.input.augment.crop_size == 512
  assert full_forgery == _recipe("no_feather")[1] and "tfds:mimlv2" in full.data.train
  with pytest.raises(Exception, match="unknown variant part 'huge'"):
    config_lib.load_config(f"{CONFIG}:huge")


@pytest.fixture
def real_style_set(tmp_path):
  """Two 'tampered' images with masks and two authentic ones, as an IMDLBenCo JSON list."""
  root = tmp_path / "real"
  root.mkdir()
  entries = []
  for k in range(2):
    image = noise(64, 96, 50 + k)
    mask = np.zeros((64, 96), np.uint8)
    mask[10:40, 20 + 10 * k : 60] = 255
    image[mask > 0] = noise(64, 96, 70 + k)[mask > 0] // 2
    io.write_image(str(root / f"t{k}.png"), image)
    io.write_image(str(root / f"t{k}_gt.png"), mask)
    io.write_image(str(root / f"a{k}.png"), noise(64, 96, 90 + k))
    entries += [[f"t{k}.png", f"t{k}_gt.png"], [f"a{k}.png", "Negative"]]
  listing = root / "list.json"
  listing.write_text(json.dumps(entries))
  return f"benco:{listing}"


@pytest.mark.slow
def test_tiny_run_trains_and_is_tabulated(coco_root, real_style_set, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "run"
  code = cli.main(
    [
      "train",
      "--config",
      f"{CONFIG}:tiny",
      "--workdir",
      str(workdir),
      f"--config.data.train=coco_splice:{coco_root}+coco_copymove:{coco_root}+coco:{coco_root}",
      f"--config.data.validation=coco_splice:{coco_root}",
    ]
  )
  _, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert "step 3/3" in err
  out_json = tmp_path / "table.json"
  args = ["--run", f"tiny={workdir}", "--data", real_style_set, "--out", str(out_json)]
  transfer_table.main(args)
  out, _ = capsys.readouterr()
  rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
  assert len(rows) == 1 and "| 1 | 3 |" in rows[0]
  table = json.loads(out_json.read_text())
  [run] = table["tiny"]["runs"]
  metrics = json.loads((workdir / "real_eval_list" / "metrics.json").read_text())
  assert run["iou"] == metrics["summary"]["iou"] and run["steps"] == 3
  assert table["trivial"]["all_one"]["iou"] > 0 and "| all_one |" in out
  assert metrics["image_level"]["max"]["num_authentic"] == 2
  # A second call reuses the saved report instead of scoring again.
  stamp = os.path.getmtime(workdir / "real_eval_list" / "metrics.json")
  transfer_table.main(args)
  assert os.path.getmtime(workdir / "real_eval_list" / "metrics.json") == stamp
  # --keep: a row added under another name keeps the earlier rows, read from the file.
  transfer_table.main(["--keep", "--run", f"again={workdir}", "--data", real_style_set,
                       "--out", str(out_json)])  # fmt: skip
  out, _ = capsys.readouterr()
  assert "| tiny | 1 | 3 |" in out and "| again | 1 | 3 |" in out
  assert set(json.loads(out_json.read_text())) == {"tiny", "again", "trivial", "data"}
  # A second seed joins its row though the first seed's workdir is gone (here: renamed in the
  # file); running the same name and workdir again replaces that run instead of doubling it.
  table = json.loads(out_json.read_text())
  table["tiny"]["runs"][0]["workdir"] = "workdirs/gone_s0"
  out_json.write_text(json.dumps(table))
  for _ in range(2):
    transfer_table.main(["--keep", "--run", f"tiny={workdir}", "--data", real_style_set,
                         "--out", str(out_json)])  # fmt: skip
  out, _ = capsys.readouterr()
  runs = json.loads(out_json.read_text())["tiny"]["runs"]
  assert [r["workdir"] for r in runs] == ["workdirs/gone_s0", str(workdir)]
  assert "| tiny | 2 | 3 |" in out
  with pytest.raises(SystemExit, match="scores another set"):
    transfer_table.main(["--keep", "--run", f"tiny={workdir}", "--out", str(out_json)])
  # Another list of the same name is not mistaken for the one scored.
  with pytest.raises(SystemExit, match="not benco:/elsewhere/list.json"):
    transfer_table.main(["--run", f"tiny={workdir}", "--data", "benco:/elsewhere/list.json"])


def test_web_pairs_set_masks_in_place_edits_and_leaves_out_the_rest(tmp_path):
  """experiments/reports/web_pairs_set.py on generated pairs: an in-place edit's mask is the
  edit (isolated changed pixels dropped, a hole where the paste matches the photo filled); a
  global edit is left out and listed; a pair of different sizes is not an in-place edit."""
  import web_pairs_set

  pairs = tmp_path / "pairs"
  photo = noise(80, 120, 1)
  edited = photo.copy()
  edited[20:60, 30:90] = noise(80, 120, 2)[20:60, 30:90] // 2 + 128
  edited[35:45, 50:60] = photo[35:45, 50:60]  # pasted pixels equal to those they cover
  edited[5, 5] = 255 - photo[5, 5]  # a lone changed pixel, e.g. a re-encoding outlier
  truth = np.zeros((80, 120), bool)
  truth[20:60, 30:90] = True
  for pid, (authentic, forged) in {
    "edit": (photo, edited),
    "grade": (photo, 255 - photo),
    "paste": (photo, noise(60, 90, 3)),
  }.items():
    (pairs / pid).mkdir(parents=True)
    io.write_image(str(pairs / pid / "0.png"), authentic)
    io.write_image(str(pairs / pid / "1.png"), forged)

  mask = web_pairs_set.derived_mask(photo, edited, threshold=24)
  assert mask[truth].mean() == 1.0 and not mask[~truth].any()

  out = tmp_path / "set"
  web_pairs_set.main(["--pairs", str(pairs), "--out", str(out)])
  entries = json.loads((out / "web_spg.json").read_text())
  assert [e[1] for e in entries] == ["masks/edit.png", "Negative"]
  assert os.path.samefile(out / entries[0][0], pairs / "edit" / "1.png")
  assert (io.read_mask(str(out / "masks" / "edit.png")) > 0).sum() == truth.sum()
  assert (out / "excluded.txt").read_text().startswith("grade: the difference covers")
  assert (out / "contact_sheet.jpg").exists()


@pytest.mark.shared_data
def test_web_pairs_set_on_the_shared_pairs(shared_data, tmp_path):
  """The set experiments/README.md scores: 23 in-place edits, each with its authentic source,
  and the 2 global edits left out."""
  import web_pairs_set

  out = tmp_path / "set"
  web_pairs_set.main(["--pairs", os.path.join(shared_data, "web_pairs"), "--out", str(out)])
  entries = json.loads((out / "web_spg.json").read_text())
  assert len(entries) == 46 and sum(mask == "Negative" for _, mask in entries) == 23
  left_out = (out / "excluded.txt").read_text().splitlines()
  assert [line.split(":")[0] for line in left_out] == ["I31", "I43"]
