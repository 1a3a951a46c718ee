"""The main job through its public entry point, on tiny shapes: train -> checkpoint -> resume
(exactly) -> eval -> predict, and the bad inputs a user can give each command."""

import json
import os

import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.input import synthetic

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")
TINY = [
    "--config.data.image_size=64", "--config.input.augment.crop_size=64",
    "--config.input.batch_size=4", "--config.data.train=synthetic:16",
    "--config.data.validation=synthetic:6", "--config.model.backbone.dims=(8,16,16,16)",
    "--config.model.head.channels=8", "--config.model.head.feat0_channels=8",
    "--config.model.head.kernel_gen_dims=(4,4,4,4,4)", "--config.model.head.kernel_gen_size=16",
    "--config.model.head.image_head_dims=(8,8,8)", "--config.loss.ohem_min_kept=1000",
    "--config.train.log_every=1", "--config.train.checkpoint_every=2",
    "--config.train.eval_every=0", "--config.eval.batch_size=4", "--config.eval.num_pictures=2",
]


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def train(capsys, workdir, steps, *extra):
  return run(capsys, "train", "--config", QUICKSTART, "--workdir", str(workdir), "--json",
             *TINY, f"--config.train.steps={steps}", *extra)


def _params(workdir, step):
  from miml_jax import checkpoint
  _, _, variables, _ = checkpoint.load_model(str(workdir), step)
  return variables


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 4-step run, shared by the tests below (training is the slow part)."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  code = cli.main(["train", "--config", QUICKSTART, "--workdir", str(workdir), "--json", *TINY,
                   "--config.train.steps=4"])
  assert code == 0
  return workdir


def test_train_writes_everything(trained):
  for name in ("config.json", "metrics.jsonl", "metrics.json", "predictions.png", "curves.png"):
    assert os.path.isfile(trained / name), name
  assert sorted(os.listdir(trained / "checkpoints")) == ["2", "4"]
  metrics = json.loads((trained / "metrics.json").read_text())
  assert metrics["step"] == 4 and metrics["summary"]["num_images"] == 6
  history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]
  assert all(np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 for r in history if "loss" in r)


def test_resume_is_exact(trained, tmp_path, capsys):
  """A run that died after its step-2 checkpoint resumes to the same step-4 weights, bit for bit
  (same batches from the restored grain iterator, same RNG, same optimiser state)."""
  import shutil
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = train(capsys, workdir, 4)
  assert code == 0 and "resumed from" in err and "checkpoints/2" in err
  resumed, straight = _params(workdir, 4), _params(trained, 4)
  import jax
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_onto_another_mesh(trained, tmp_path, capsys):
  """A checkpoint written with pure data parallelism (mesh data=2) resumes with its weights
  and optimiser state sharded (data=1, fsdp=2) and reaches the same step-4 weights, up to the
  order of cross-device sums."""
  import shutil
  import jax
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = train(capsys, workdir, 4, "--config.mesh.data=1", "--config.mesh.fsdp=2",
                       "--config.mesh.fsdp_min_size=256")
  assert code == 0 and "resumed from" in err and "'fsdp': 2" in err
  resumed, straight = _params(workdir, 4), _params(trained, 4)
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_eval_cli(trained, tmp_path, capsys):
  code, out, _ = run(capsys, "eval", "--checkpoint", str(trained), "--json",
                     "--out", str(tmp_path / "e"))
  assert code == 0
  result = json.loads(out)
  assert result["step"] == 4 and result["summary"]["num_images"] == 6
  assert result["trivial"]["all_zero"]["iou"] == 0.0
  stored = json.loads((tmp_path / "e" / "metrics.json").read_text())
  assert stored["summary"] == result["summary"]
  assert (tmp_path / "e" / "per_image.csv").read_text().count("\n") == 7
  # Restored weights reproduce the trainer's own final evaluation (which ran sharded over two
  # devices, so sums may differ in the last bits).
  trainer = json.loads((trained / "metrics.json").read_text())["summary"]
  assert result["summary"] == pytest.approx(trainer, rel=1e-6, abs=1e-9)
  code, _, err = run(capsys, "eval", "--checkpoint", str(trained), "--out", str(tmp_path / "e"))
  assert code == 2 and "exists and is not empty" in err


def test_eval_on_folder_with_image_head_threshold(trained, tmp_path, capsys):
  data = synthetic.SyntheticForgeries("validation", num_examples=3, image_size=72, seed=5)
  synthetic.export_folder(data, str(tmp_path / "d"))
  code, out, _ = run(capsys, "eval", "--checkpoint", str(trained), "--json",
                     "--data", f"folder:{tmp_path / 'd'}", "--threshold", "image_head")
  assert code == 0
  result = json.loads(out)
  assert result["summary"]["num_images"] == 3 and result["threshold"] == "image_head"


def test_predict_cli(trained, tmp_path, capsys):
  rng = np.random.default_rng(0)
  images = tmp_path / "in"
  images.mkdir()
  io.write_image(str(images / "a.png"), rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
  io.write_image(str(images / "b.jpg"), rng.integers(0, 255, (33, 40, 3), dtype=np.uint8))
  out_dir = tmp_path / "out"
  code, out, _ = run(capsys, "predict", str(images), "--checkpoint", str(trained), "--out",
                     str(out_dir), "--qes", "--json")
  assert code == 0
  records = json.loads(out)["predictions"]
  assert [(r["height"], r["width"]) for r in records] == [(50, 70), (33, 40)]
  assert all(0.0 <= r["qes"] <= 1.0 and 0.0 <= r["image_score"] <= 1.0 for r in records)
  mask = io.read_mask(str(out_dir / "a_mask.png"))
  assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
  assert io.read_image(str(out_dir / "b_overlay.png")).shape == (33, 40, 3)
  before = (out_dir / "a_heatmap.png").read_bytes()
  code, _, err = run(capsys, "predict", str(images), "--checkpoint", str(trained), "--out",
                     str(out_dir))
  assert code == 2 and "a_heatmap.png: exists" in err
  assert (out_dir / "a_heatmap.png").read_bytes() == before


def test_official_weights_convert_then_eval_predict_train(trained, tmp_path, capsys):
  """The trained weights, written as an official-style PyTorch checkpoint (torch key names,
  DDP prefix), go through `convert` and score exactly as the checkpoint does via `--init`."""
  from miml_jax.models import convert
  torch = pytest.importorskip("torch")
  state_dict = convert.variables_to_state_dict(_params(trained, 4))
  pth = tmp_path / "official.pth"
  torch.save({"state_dict": {"module." + k: torch.from_numpy(np.array(v))
                             for k, v in state_dict.items()}}, str(pth))
  init = tmp_path / "init.msgpack"
  code, out, _ = run(capsys, "convert", str(pth), "--config", QUICKSTART, *TINY,
                     "--out", str(init), "--json")
  assert code == 0
  report = json.loads(out)
  assert report["converted"] == report["target_tensors"] and report["unmapped"] == []
  code, _, err = run(capsys, "convert", str(pth), "--config", QUICKSTART, *TINY,
                     "--out", str(init))
  assert code == 2 and "init.msgpack: exists" in err

  code, out, _ = run(capsys, "eval", "--init", str(init), "--config", QUICKSTART, *TINY, "--json")
  assert code == 0
  from_init = json.loads(out)["summary"]
  code, out, _ = run(capsys, "eval", "--checkpoint", str(trained), "--json")
  assert from_init == pytest.approx(json.loads(out)["summary"], rel=1e-6, abs=1e-9)

  image = tmp_path / "in.png"
  io.write_image(str(image), np.full((40, 40, 3), 128, np.uint8))
  code, out, _ = run(capsys, "predict", str(image), "--init", str(init), "--config", QUICKSTART,
                     *TINY, "--out", str(tmp_path / "p"), "--json")
  assert code == 0 and json.loads(out)["predictions"][0]["height"] == 40
  code, _, err = run(capsys, "predict", str(image), "--init", str(init), "--out",
                     str(tmp_path / "q"))
  assert code == 2 and "--config" in err

  code, _, err = train(capsys, tmp_path / "w", 1, "--init", str(init))
  assert code == 0
  n = report["target_tensors"]
  assert f"initialised {n} of {n} tensors from {init}" in err


def test_nan_policy(trained, tmp_path, capsys):
  # A NaN learning rate makes every update non-finite: 'stop' ends the run with exit code 3,
  # 'skip' trains on without applying any of them (weights stay at their initial values).
  code, _, err = train(capsys, tmp_path / "stop", 2, "--config.optim.lr=nan")
  assert code == 3 and "non-finite" in err and "nan_policy='stop'" in err
  code, _, err = train(capsys, tmp_path / "skip", 2, "--config.optim.lr=nan",
                       "--config.train.nan_policy=skip")
  assert code == 0 and "skipped" in err
  history = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text()
             .splitlines()]
  assert [r["nan_skips"] for r in history if "loss" in r] == [1, 2]


def test_bad_inputs_get_one_line_errors(trained, tmp_path, capsys):
  cases = [
      (["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "x"),
        "--config.train.stepz=3"], "no config key 'train.stepz'"),
      (["train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "x")],
       "none.py: config file not found"),
      (["eval", "--checkpoint", str(tmp_path)], "no checkpoint here"),
      (["predict", str(tmp_path / "missing.png"), "--checkpoint", str(trained)],
       "missing.png: no such file or folder"),
      (["qes", str(tmp_path / "missing.png")], "missing.png"),
  ]
  for argv, message in cases:
    code, _, err = run(capsys, *argv)
    assert code == 2, argv
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_workdir_of_another_model_is_refused(trained, capsys):
  before = sorted(os.listdir(trained / "checkpoints"))
  config_before = (trained / "config.json").read_text()
  code, _, err = train(capsys, trained, 6, "--config.model.head.fusion=sum")
  assert code == 2 and "holds a checkpoint of another model" in err
  assert "model.head.fusion" in err
  assert sorted(os.listdir(trained / "checkpoints")) == before
  assert (trained / "config.json").read_text() == config_before


def test_qes_cli(tmp_path, capsys):
  soft = np.zeros((20, 20), np.uint8)
  soft[:10] = 255  # 200 confident pixels
  soft[10:15] = 128  # 100 unsure pixels -> QES 2/3
  io.write_image(str(tmp_path / "m.png"), soft)
  code, out, _ = run(capsys, "qes", str(tmp_path / "m.png"), "--json")
  assert code == 0
  record = json.loads(out)["masks"][0]
  assert record["qes"] == pytest.approx(2 / 3, abs=1e-6) and record["keep"] is True
