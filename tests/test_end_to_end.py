"""The main job through its public entry point, on tiny shapes: train -> checkpoint -> resume
(exactly, also after kill -9 and across process counts) -> eval -> predict, two processes
against one, and the bad inputs a user can give each command."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from miml_jax import cli, io
from miml_jax.input import synthetic
from tiny_run import QUICKSTART, TINY
from torch_export import variables_to_state_dict


def run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def train(capsys, workdir, steps, *extra):
  return run(
    capsys,
    "train",
    "--config",
    QUICKSTART,
    "--workdir",
    str(workdir),
    "--json",
    *TINY,
    f"--config.train.steps={steps}",
    *extra,
  )


def _params(workdir, step):
  from miml_jax import checkpoint

  _, _, variables, _ = checkpoint.load_model(str(workdir), step)
  return variables


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 4-step run, shared by the tests below (training is the slow part)."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  code = cli.main(
    [
      "train",
      "--config",
      QUICKSTART,
      "--workdir",
      str(workdir),
      "--json",
      *TINY,
      "--config.train.steps=4",
    ]
  )
  assert code == 0
  return workdir


def test_train_writes_everything(trained):
  for name in ("config.json", "metrics.jsonl", "metrics.json", "predictions.png", "curves.png"):
    assert os.path.isfile(trained / name), name
  assert sorted(os.listdir(trained / "checkpoints")) == ["2", "4"]
  metrics = json.loads((trained / "metrics.json").read_text())
  assert metrics["step"] == 4 and metrics["summary"]["num_images"] == 6
  history = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in history if "loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  assert all(
    np.isfinite(r["loss"]) and r["steps_per_sec"] > 0 and r["tflops_per_device"] > 0
    for r in train_rows
  )
  assert "mfu" not in train_rows[0]  # CPU has no known peak, so no MFU is claimed.
  # The best validation checkpoint (the only evaluation is the final one) holds weights only.
  assert os.listdir(trained / "best") == ["4"]
  items = set(os.listdir(trained / "best" / "4"))
  assert {"model", "config"} <= items and "train" not in items
  # TensorBoard reads the same scalars as metrics.jsonl.
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(trained / "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [
    (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train_rows
  ]
  assert events.Scalars("val_iou")[0].value == pytest.approx(metrics["summary"]["iou"], rel=1e-6)


def test_resume_is_exact(trained, tmp_path, capsys):
  """A run that died after its step-2 checkpoint resumes to the same step-4 weights, bit for bit
  (the same batches from the pipeline rebuilt at step 2, same RNG, same optimiser state)."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = train(capsys, workdir, 4)
  assert code == 0 and "resumed from" in err and "checkpoints/2" in err
  _assert_same_params(workdir, trained, 4)


def test_resume_onto_another_mesh(trained, tmp_path, capsys):
  """A checkpoint written with pure data parallelism (mesh data=2) resumes with its weights
  and optimiser state sharded (data=1, fsdp=2) and reaches the same step-4 weights, up to the
  order of cross-device sums."""
  import jax

  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = train(
    capsys,
    workdir,
    4,
    "--config.mesh.data=1",
    "--config.mesh.fsdp=2",
    "--config.mesh.fsdp_min_size=256",
  )
  assert code == 0 and "resumed from" in err and "'fsdp': 2" in err
  resumed, straight = _params(workdir, 4), _params(trained, 4)
  for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(straight)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_eval_cli(trained, tmp_path, capsys):
  code, out, _ = run(
    capsys, "eval", "--checkpoint", str(trained), "--json", "--out", str(tmp_path / "e")
  )
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
  # One step's folder names its checkpoint too (as the demo's --model W/checkpoints/4 does).
  from miml_jax import checkpoint
  from miml_jax.errors import UserInputError

  step_dir = trained / "checkpoints" / "4"
  assert checkpoint.find_checkpoint(str(step_dir)) == (str(trained / "checkpoints"), 4)
  with pytest.raises(UserInputError, match="not of step 2"):
    checkpoint.find_checkpoint(str(step_dir), 2)


def test_eval_on_folder_with_image_head_threshold(trained, tmp_path, capsys):
  data = synthetic.SyntheticForgeries("validation", num_examples=3, image_size=72, seed=5)
  synthetic.export_folder(data, str(tmp_path / "d"))
  code, out, _ = run(
    capsys,
    "eval",
    "--checkpoint",
    str(trained),
    "--json",
    "--data",
    f"folder:{tmp_path / 'd'}",
    "--threshold",
    "image_head",
  )
  assert code == 0
  result = json.loads(out)
  assert result["summary"]["num_images"] == 3 and result["threshold"] == "image_head"


def test_eval_report_on_benco_layouts_with_robustness(trained, tmp_path, capsys):
  """IMDLBenCo's Tp/Gt folders and JSON list (with authentic images), every convention, the
  image-level scores, a robustness sweep and the Markdown report with its pictures."""
  data = synthetic.SyntheticForgeries("validation", num_examples=4, image_size=64, seed=7)
  os.makedirs(tmp_path / "b" / "Tp")
  os.makedirs(tmp_path / "b" / "Gt")
  entries = []
  for index in range(len(data)):
    sample = data[index]
    io.write_image(str(tmp_path / "b" / "Tp" / f"{index}.png"), sample["image"])
    io.write_image(str(tmp_path / "b" / "Gt" / f"{index}_gt.png"), sample["mask"] * 255)
    entries.append([f"b/Tp/{index}.png", f"b/Gt/{index}_gt.png"])
    authentic = np.ascontiguousarray(sample["image"][::-1])  # Another image, no edit marked.
    io.write_image(str(tmp_path / "b" / f"au{index}.png"), authentic)
    entries.append([f"b/au{index}.png", "Negative"])
  (tmp_path / "list.json").write_text(json.dumps(entries))

  code, out, err = run(
    capsys,
    "eval",
    "--checkpoint",
    str(trained),
    "--json",
    "--data",
    f"benco:{tmp_path / 'b'}",
    "--conventions",
    "none",
  )
  assert code == 0, err
  folder = json.loads(out)
  assert folder["summary"]["num_images"] == 4 and folder["conventions"] == {}

  report_dir = tmp_path / "report"
  code, out, err = run(
    capsys,
    "eval",
    "--checkpoint",
    str(trained),
    "--json",
    "--data",
    f"benco:{tmp_path / 'list.json'}",
    "--out",
    str(report_dir),
    "--perturb",
    "jpeg:60",
    "--perturb",
    "resize:0.75",
    "--pictures",
    "2",
  )
  assert code == 0, err
  result = json.loads(out)
  # The same four manipulated images as the folder layout, so the same headline.
  assert result["summary"] == pytest.approx(folder["summary"], rel=1e-6, abs=1e-9)
  from miml_jax import evaluate

  assert (
    set(result["conventions"])
    == set(evaluate.CONVENTIONS)
    >= {
      "fixed_0.5",
      "best_per_image",
      "best_per_image_inverse",
      "trufor_fixed_0.5",
      "trufor_best",
    }
  )
  # The oracle can only do better than any fixed threshold.
  assert (
    result["conventions"]["best_per_image"]["f1"] >= result["conventions"]["fixed_0.5"]["f1"] - 1e-9
  )
  for score in ("max", "head"):  # The quickstart model has an image head.
    level = result["image_level"][score]
    assert level["num_manipulated"] == 4 and level["num_authentic"] == 4
    assert 0 <= level["auc"] <= 1
  rows = result["robustness"]
  assert [(r["kind"], r["value"]) for r in rows] == [
    ("jpeg", None),
    ("jpeg", 60),
    ("resize", None),
    ("resize", 0.75),
  ]
  assert rows[0]["iou"] == result["summary"]["iou"]
  report = (report_dir / "report.md").read_text()
  for section in (
    "## Headline",
    "## Other conventions",
    "trufor_best",
    "## Image-level",
    "## Robustness",
    "![curves](curves.png)",
    "![best](best.jpg)",
    "--perturb jpeg:60",
  ):
    assert section in report, section
  for name in (
    "curves.png",
    "histograms.png",
    "best.jpg",
    "worst.jpg",
    "robustness.png",
    "metrics.json",
    "per_image.csv",
    "per_image_detection.csv",
    "robustness.csv",
  ):
    assert (report_dir / name).stat().st_size > 0, name
  # Two rows of four square tiles (64 x 64 images), each row scaled to 1024 wide.
  assert io.read_image(str(report_dir / "best.jpg")).shape[:2] == (2 * 1024 // 4, 1024)
  detection = (report_dir / "per_image_detection.csv").read_text()
  assert detection.count("\n") == 9
  # Images are named by their path below the folder holding them all, not by a basename.
  assert "\nTp/0.png," in detection and "\nau0.png," in detection

  # A list naming a file that is not there, and a bad perturbation, are one-line errors.
  (tmp_path / "bad.json").write_text(json.dumps([["nowhere.png", "Negative"]]))
  code, _, err = run(
    capsys, "eval", "--checkpoint", str(trained), "--data", f"benco:{tmp_path / 'bad.json'}"
  )
  assert code == 2 and "nowhere.png" in err
  code, _, err = run(capsys, "eval", "--checkpoint", str(trained), "--perturb", "jpeg:0")
  assert code == 2 and "quality" in err


def test_predict_cli(trained, tmp_path, capsys):
  rng = np.random.default_rng(0)
  images = tmp_path / "in"
  images.mkdir()
  io.write_image(str(images / "a.png"), rng.integers(0, 255, (50, 70, 3), dtype=np.uint8))
  io.write_image(str(images / "b.jpg"), rng.integers(0, 255, (33, 40, 3), dtype=np.uint8))
  out_dir = tmp_path / "out"
  code, out, _ = run(
    capsys,
    "predict",
    str(images),
    "--checkpoint",
    str(trained),
    "--out",
    str(out_dir),
    "--qes",
    "--json",
  )
  assert code == 0
  records = json.loads(out)["predictions"]
  assert [(r["height"], r["width"]) for r in records] == [(50, 70), (33, 40)]
  assert all(0.0 <= r["qes"] <= 1.0 and 0.0 <= r["image_score"] <= 1.0 for r in records)
  mask = io.read_mask(str(out_dir / "a_mask.png"))
  assert mask.shape == (50, 70) and set(np.unique(mask)) <= {0, 255}
  assert io.read_image(str(out_dir / "b_overlay.png")).shape == (33, 40, 3)
  before = (out_dir / "a_heatmap.png").read_bytes()
  code, _, err = run(
    capsys, "predict", str(images), "--checkpoint", str(trained), "--out", str(out_dir)
  )
  assert code == 2 and "a_heatmap.png: exists" in err
  assert (out_dir / "a_heatmap.png").read_bytes() == before
  # The official per-image threshold from the image head, as eval's.
  code, out, _ = run(
    capsys,
    "predict",
    str(images / "a.png"),
    "--checkpoint",
    str(trained),
    "--out",
    str(tmp_path / "head"),
    "--threshold",
    "image_head",
    "--json",
  )
  assert code == 0
  record = json.loads(out)["predictions"][0]
  assert record["threshold"] == pytest.approx(min(0.7, max(0.3, 1 - record["image_score"])))
  code, _, err = run(
    capsys, "predict", str(images), "--checkpoint", str(trained), "--threshold", "half"
  )
  assert code == 2 and "--threshold half" in err


def test_official_weights_convert_then_eval_predict_train(trained, tmp_path, capsys):
  """The trained weights, written as an official-style PyTorch checkpoint (torch key names,
  DDP prefix), go through `convert` and score exactly as the checkpoint does via `--init`."""
  torch = pytest.importorskip("torch")
  state_dict = variables_to_state_dict(_params(trained, 4))
  pth = tmp_path / "official.pth"
  torch.save(
    {"state_dict": {"module." + k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}},
    str(pth),
  )
  init = tmp_path / "init.msgpack"
  code, out, _ = run(
    capsys, "convert", str(pth), "--config", QUICKSTART, *TINY, "--out", str(init), "--json"
  )
  assert code == 0
  report = json.loads(out)
  assert report["converted"] == report["target_tensors"] and report["unmapped"] == []
  code, _, err = run(capsys, "convert", str(pth), "--config", QUICKSTART, *TINY, "--out", str(init))
  assert code == 2 and "init.msgpack: exists" in err

  code, out, _ = run(capsys, "eval", "--init", str(init), "--config", QUICKSTART, *TINY, "--json")
  assert code == 0
  from_init = json.loads(out)["summary"]
  code, out, _ = run(capsys, "eval", "--checkpoint", str(trained), "--json")
  assert from_init == pytest.approx(json.loads(out)["summary"], rel=1e-6, abs=1e-9)

  image = tmp_path / "in.png"
  io.write_image(str(image), np.full((40, 40, 3), 128, np.uint8))
  code, out, _ = run(
    capsys,
    "predict",
    str(image),
    "--init",
    str(init),
    "--config",
    QUICKSTART,
    *TINY,
    "--out",
    str(tmp_path / "p"),
    "--json",
  )
  assert code == 0 and json.loads(out)["predictions"][0]["height"] == 40
  code, _, err = run(
    capsys, "predict", str(image), "--init", str(init), "--out", str(tmp_path / "q")
  )
  assert code == 2 and "--config" in err

  code, _, err = train(capsys, tmp_path / "w", 1, "--init", str(init))
  assert code == 0
  n = report["target_tensors"]
  assert f"initialised {n} of {n} tensors from {init}" in err


def _subprocess(args, devices, **popen):
  """`miml-jax ARGS` in a fresh interpreter with `devices` simulated CPU devices."""
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  return subprocess.Popen(
    [sys.executable, "-m", "miml_jax.cli", *map(str, args)],
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **popen,
  )


def _assert_same_params(workdir_a, workdir_b, step):
  import jax

  a, b = _params(workdir_a, step), _params(workdir_b, step)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_killed_run_resumes_exactly(trained, tmp_path, capsys):
  """kill -9 once the step-2 checkpoint is on disk (steps 3-4, a save or the final evaluation
  are under way), then the same command again: the step-4 weights are those of a run that was
  never stopped, bit for bit."""
  workdir = tmp_path / "w"
  argv = ["train", "--config", QUICKSTART, "--workdir", workdir, *TINY, "--config.train.steps=4"]
  process = _subprocess(argv, devices=2)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").is_dir():
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, "no step-2 checkpoint after 300 s"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert not (workdir / "metrics.json").exists()  # It did not get to the end.
  code, _, err = train(capsys, workdir, 4)
  assert code == 0 and "resumed from" in err
  _assert_same_params(workdir, trained, 4)
  # The steps logged after the checkpoint and trained again appear once in the history.
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4]


def test_train_with_grain_workers_exits_cleanly(tmp_path):
  """With prefetch worker processes the run trains and ends without leaving grain's
  shared-memory batches to the resource tracker (whose exit warning would say "leaked")."""
  workdir = tmp_path / "w"
  argv = ["train", "--config", QUICKSTART, "--workdir", workdir, *TINY, "--config.train.steps=2"]
  process = _subprocess([*argv, "--config.input.num_workers=1"], devices=1)
  _, err = process.communicate(timeout=540)
  assert process.returncode == 0, err[-3000:]
  assert (workdir / "metrics.json").exists()
  assert "leaked shared_memory" not in err, err[-3000:]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(trained, tmp_path, capsys):
  """Two processes with one device each (jax.distributed on 127.0.0.1, gloo collectives) train
  the same global batches as one process with two devices: the same weights at every checkpoint
  and the same validation scores, bit for bit. Their checkpoint resumes in one process."""
  workdir = tmp_path / "w"
  port = _free_port()
  argv = [
    "train",
    "--config",
    QUICKSTART,
    "--workdir",
    workdir,
    "--json",
    *TINY,
    "--config.train.steps=4",
    "--coordinator",
    f"127.0.0.1:{port}",
    "--num-processes",
    2,
  ]
  processes = [_subprocess(argv + ["--process-id", i], devices=1) for i in range(2)]
  outputs = []
  for process in processes:
    try:
      outputs.append(process.communicate(timeout=540))
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      raise
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  assert "2 process(es)" in outputs[0][1]
  assert outputs[1][0] == ""  # Only process 0 reports.
  for step in (2, 4):
    _assert_same_params(workdir, trained, step)
  reported = json.loads(outputs[0][0])["summary"]
  assert reported == json.loads((trained / "metrics.json").read_text())["summary"]
  # Written by two processes, resumed by one (two devices): the same step-4 weights again.
  shutil.rmtree(workdir / "checkpoints" / "4")
  code, _, err = train(capsys, workdir, 4)
  assert code == 0 and "resumed from" in err and "1 process(es)" in err
  _assert_same_params(workdir, trained, 4)


def test_skip_mode_trains_and_evaluates_around_bad_files(trained, tmp_path, capsys):
  """data.on_error='skip' on a folder with a truncated image, a wrong-size mask and a missing
  mask: training and evaluation go on, and every skipped file is reported by name."""
  root = tmp_path / "d"
  synthetic.export_folder(
    synthetic.SyntheticForgeries("validation", num_examples=6, image_size=64, seed=2), root
  )
  (root / "imgs" / "000001.png").write_bytes(b"\x89PNG truncated")
  io.write_image(str(root / "masks" / "000002.png"), np.zeros((5, 5), np.uint8))
  os.remove(root / "masks" / "000003.png")
  data = f"folder:{root}"
  code, _, err = run(capsys, "eval", "--checkpoint", str(trained), "--data", data)
  assert code == 2 and "000003.png: no mask" in err
  code, out, _ = run(
    capsys,
    "eval",
    "--checkpoint",
    str(trained),
    "--data",
    data,
    "--json",
    "--config.data.on_error=skip",
  )
  assert code == 0
  result = json.loads(out)
  assert result["summary"]["num_images"] == 3
  assert sorted(m.split(":")[0].rsplit("/", 1)[1] for m in result["unreadable_skipped"]) == [
    "000001.png",
    "000002.png",
    "000003.png",
  ]
  workdir = tmp_path / "w"
  code, _, err = train(
    capsys, workdir, 2, f"--config.data.train={data}", "--config.data.on_error=skip"
  )
  assert code == 0 and "skipped" in err
  report = (workdir / "skipped_examples.txt").read_text()
  assert "000003.png" in report and "listing data.train" in report
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # 2 steps x 4 = 8 draws from the 5 listed examples: the first epoch alone meets both
  # unreadable ones. The count also holds the one left out when listing.
  assert report.count("training") >= 2
  assert [r["data_skipped"] for r in history if "loss" in r][-1] == 1 + report.count("training")


def test_nan_policy(trained, tmp_path, capsys):
  # A learning rate of 1e30 (a NaN one is refused by config validation) overflows the weights
  # at the first update: 'stop' ends the run with exit code 3 at the first non-finite step,
  # 'skip' trains on without applying any update (weights stay at their initial values).
  code, _, err = train(capsys, tmp_path / "stop", 2, "--config.optim.lr=1e30")
  assert code == 3 and "non-finite" in err and "nan_policy='stop'" in err
  code, _, err = train(
    capsys, tmp_path / "skip", 2, "--config.optim.lr=1e30", "--config.train.nan_policy=skip"
  )
  assert code == 0 and "skipped" in err
  history = [
    json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
  ]
  assert [r["nan_skips"] for r in history if "loss" in r] == [1, 2]


def test_bad_inputs_get_one_line_errors(trained, tmp_path, capsys):
  cases = [
    (
      ["train", "--config", QUICKSTART, "--workdir", str(tmp_path / "x"), "--config.train.stepz=3"],
      "no config key 'train.stepz'",
    ),
    (
      ["train", "--config", str(tmp_path / "none.py"), "--workdir", str(tmp_path / "x")],
      "none.py: config file not found",
    ),
    (["eval", "--checkpoint", str(tmp_path)], "no checkpoint here"),
    (
      ["predict", str(tmp_path / "missing.png"), "--checkpoint", str(trained)],
      "missing.png: no such file or folder",
    ),
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
