"""Faults a user met, each through the public entry point on the tiny quickstart run: absurd
updates under train.nan_policy, non-finite model outputs at validation and eval, broken
checkpoints (a truncated data file, a zeroed _METADATA) in train and eval, bad numbers and
paths that must be one-line errors creating nothing, and reports without absolute paths."""

import argparse
import json
import os
import shutil

import numpy as np
import pytest

from miml_jax import cli
from tiny_run import QUICKSTART, TINY

# A failed orbax read leaves its other reads' coroutines unawaited: expected, not a fault.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def train(capsys, workdir, steps, *extra):
  return run(
    capsys,
    "train",
    "--config",
    QUICKSTART,
    "--workdir",
    workdir,
    "--json",
    *TINY,
    f"--config.train.steps={steps}",
    *extra,
  )


def history(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if '"loss"' in line]


def one_line_error(code, err, message):
  assert code == cli.EXIT_USER_ERROR, err
  assert message in err and err.count("\n") == 1 and err.startswith("error: "), err
  assert "Traceback" not in err


def params(workdir, step=None):
  from miml_jax import checkpoint

  return checkpoint.load_model(str(workdir), step)[2]


def assert_same_params(a, b):
  import jax

  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 4-step run (checkpoints 2 and 4), shared by the tests below."""
  workdir = tmp_path_factory.mktemp("faults") / "w"
  code = cli.main(
    ["train", "--config", QUICKSTART, "--workdir", str(workdir), "--json", *TINY]
    + ["--config.train.steps=4"]
  )
  assert code == 0
  return workdir


# ---- Absurd updates and non-finite outputs ---------------------------------------------------
def test_absurd_updates_are_skipped_or_stop(trained, tmp_path, capsys):
  """lr 1e6: every update is many times the weights. Finite, but under 'skip' none is applied
  (the weights stay those of the initialisation and validation runs on them); under 'stop' the
  run goes on until the weights overflow, then stops at the first non-finite step."""
  huge = "--config.optim.lr=1e6"
  code, _, err = train(capsys, tmp_path / "skip", 4, huge, "--config.train.nan_policy=skip")
  assert code == 0, err
  assert "max_update_ratio" in err and "skipped (train.nan_policy='skip')" in err
  assert [r["nan_skips"] for r in history(tmp_path / "skip")] == [1, 2, 3, 4]
  # Nothing was applied: the checkpointed weights are the initial ones, the same at each step.
  import jax

  leaves = jax.tree_util.tree_leaves(params(tmp_path / "skip", 4))
  assert max(float(np.abs(np.asarray(x)).max()) for x in leaves) < 100
  assert_same_params(params(tmp_path / "skip", 2), params(tmp_path / "skip", 4))

  code, _, err = train(capsys, tmp_path / "stop", 4, huge)
  assert code == cli.EXIT_NON_FINITE, err
  assert "non-finite" in err and "stopping (train.nan_policy='stop')" in err


def test_non_finite_outputs_are_the_models_fault(tmp_path, capsys):
  """With the ratio check off, lr 1e6 blows the weights up while they stay finite; the final
  validation then says the model's outputs are not finite (exit code 3), and does not blame the
  data's value range."""
  code, _, err = train(
    capsys,
    tmp_path / "w",
    4,
    "--config.optim.lr=1e6",
    "--config.train.nan_policy=skip",
    "--config.train.max_update_ratio=inf",
  )
  assert code == cli.EXIT_NON_FINITE, err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: validation @ step 4: the model's outputs are not finite"), last
  assert "255" not in err and "Traceback" not in err


def test_eval_of_non_finite_weights_names_the_checkpoint(trained, tmp_path, capsys):
  import jax

  from miml_jax import checkpoint

  config, _, variables, _ = checkpoint.load_model(str(trained))
  broken = tmp_path / "nan"
  saver = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(broken)))
  saver.save(4, jax.tree_util.tree_map(lambda x: x * np.nan, variables), config)
  saver.close()
  code, _, err = run(capsys, "eval", "--checkpoint", broken)
  assert code == cli.EXIT_NON_FINITE, err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: {broken} @ step 4: the model's outputs are not finite"), last
  assert "255" not in err


# ---- Broken checkpoints ----------------------------------------------------------------------
def truncate_data_file(step_dir, item="model"):
  """Cuts the largest array file orbax wrote for `item` to its first 64 bytes (not to half: the
  second half of a file can hold bytes no array refers to any more)."""
  data = step_dir / item / "ocdbt.process_0" / "d"
  largest = max(data.iterdir(), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(64)


def zero_metadata(step_dir, item="train"):
  path = step_dir / item / "_METADATA"
  path.write_bytes(b"\0" * path.stat().st_size)


@pytest.mark.parametrize(
  "fault", [truncate_data_file, zero_metadata], ids=["truncated_model_file", "zeroed_train_meta"]
)
def test_train_resumes_from_the_newest_intact_checkpoint(trained, tmp_path, capsys, fault):
  """A broken step-4 checkpoint is named, set aside, and the run resumes from step 2: its
  step-4 weights are those of the run that was never broken, bit for bit."""
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  fault(workdir / "checkpoints" / "4")
  code, _, err = train(capsys, workdir, 4)
  assert code == 0, err
  warning = f"warning: {workdir}/checkpoints/4 is unreadable ("
  assert warning in err and "); using step 2\n" in err and "Traceback" not in err, err
  assert f"resumed from {workdir}/checkpoints/2" in err
  if fault is zero_metadata:
    assert "(train/_METADATA: JSONDecodeError" in err
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
  assert os.listdir(workdir / "checkpoints.unreadable") == ["4"]
  assert_same_params(params(workdir, 4), params(trained, 4))


def test_eval_falls_back_to_the_newest_intact_checkpoint(trained, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  truncate_data_file(workdir / "checkpoints" / "4")
  code, out, err = run(capsys, "eval", "--checkpoint", workdir, "--json")
  assert code == 0, err
  assert json.loads(out)["step"] == 2
  assert f"warning: {workdir}/checkpoints/4 is unreadable (" in err and "Traceback" not in err
  assert "); using step 2\n" in err
  # A step asked for is never swapped for another.
  code, _, err = run(capsys, "eval", "--checkpoint", workdir, "--step", 4)
  one_line_error(code, err, f"{workdir}/checkpoints/4 is unreadable (")
  # A zeroed model _METADATA in the older one too: nothing intact is left, one line.
  zero_metadata(workdir / "checkpoints" / "2", "model")
  code, _, err = run(capsys, "eval", "--checkpoint", workdir)
  one_line_error(code, err, "so are the older step(s) 2; no intact checkpoint to use")


def test_unreadable_workdir_config_is_one_line(trained, tmp_path, capsys):
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  (workdir / "config.json").write_bytes(b"\0" * 16)
  code, _, err = train(capsys, workdir, 6)
  one_line_error(code, err, f"{workdir}/config.json: unreadable (")


# ---- Bad numbers and paths: one line, nothing created ----------------------------------------
@pytest.mark.parametrize(
  "override, message",
  [
    ("input.batch_size=-4", "input.batch_size: expected >= 1, got -4"),
    ("input.batch_size=0", "input.batch_size: expected >= 1, got 0"),
    ("train.log_every=0", "train.log_every: expected >= 1, got 0"),
    # The quickstart's optim.total_steps is train.steps (a FieldReference), checked first.
    ("train.steps=0", "steps: expected >= 1, got 0"),
    ("train.checkpoint_every=0", "train.checkpoint_every: expected >= 1, got 0"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: expected >= 1, got 0"),
    ("train.max_update_ratio=0", "train.max_update_ratio: expected > 0, got 0.0"),
    ("eval.batch_size=0", "eval.batch_size: expected >= 1, got 0"),
    ("eval.threshold=2", "eval.threshold: expected a value in [0, 1], got 2.0"),
    ("input.num_workers=-1", "input.num_workers: expected >= 0, got -1"),
  ],
)
def test_bad_numbers_are_one_line_and_create_nothing(tmp_path, capsys, override, message):
  workdir = tmp_path / "w"
  code, _, err = train(capsys, workdir, 2, f"--config.{override}")
  one_line_error(code, err, message)
  assert not workdir.exists()


def _refuse_writes(monkeypatch, directory):
  """Root writes into a 0o500 directory anyway (os.access says so): there, pretend it cannot."""
  os.chmod(directory, 0o500)
  if os.geteuid() == 0:
    real = os.access
    monkeypatch.setattr(
      os, "access", lambda p, mode, **kw: False if str(p) == str(directory) else real(p, mode, **kw)
    )


@pytest.mark.parametrize("case", ["file", "under_file", "read_only"])
def test_bad_workdir_is_one_line_and_creates_nothing(tmp_path, capsys, monkeypatch, case):
  (tmp_path / "f").write_text("x")
  (tmp_path / "ro").mkdir()
  workdir, message = {
    "file": (tmp_path / "f", f"--workdir {tmp_path}/f: is a file, not a directory"),
    "under_file": (tmp_path / "f" / "w", f"{tmp_path}/f is a file, not a directory"),
    "read_only": (tmp_path / "ro" / "w", f"{tmp_path}/ro is not writable"),
  }[case]
  if case == "read_only":
    _refuse_writes(monkeypatch, tmp_path / "ro")
  code, _, err = train(capsys, workdir, 2)
  one_line_error(code, err, message)
  assert sorted(os.listdir(tmp_path)) == ["f", "ro"] and not os.listdir(tmp_path / "ro")


def test_bad_eval_and_predict_flags_are_one_line(trained, tmp_path, capsys, monkeypatch):
  (tmp_path / "f").write_text("x")
  (tmp_path / "ro").mkdir()
  _refuse_writes(monkeypatch, tmp_path / "ro")
  image = tmp_path / "image.png"
  from miml_jax import io

  io.write_image(str(image), np.zeros((32, 32, 3), np.uint8))
  cases = [
    (["eval", "--out", tmp_path / "f"], f"--out {tmp_path}/f: is a file, not a directory"),
    (["eval", "--out", tmp_path / "f" / "e"], f"{tmp_path}/f is a file, not a directory"),
    (["eval", "--out", tmp_path / "ro" / "e"], f"{tmp_path}/ro is not writable"),
    (["eval", "--out", tmp_path / "e", "--threshold", "2"], "--threshold 2: expected a number"),
    (["eval", "--threshold", "-0.1"], "--threshold -0.1: expected a number in [0, 1]"),
    (["eval", "--limit", "0"], "--limit 0: expected a number of images >= 1"),
    (["predict", image, "--threshold", "2"], "--threshold 2: expected a number in [0, 1]"),
    (["predict", image, "--out", tmp_path / "f"], f"--out {tmp_path}/f: is a file"),
  ]
  for argv, message in cases:
    code, _, err = run(capsys, *argv, "--checkpoint", trained)
    one_line_error(code, err, message)
  assert sorted(os.listdir(tmp_path)) == ["f", "image.png", "ro"]
  assert not os.listdir(tmp_path / "ro")


# ---- Reports name no absolute path -----------------------------------------------------------
def test_eval_report_records_paths_as_given(trained, tmp_path, capsys, monkeypatch):
  os.symlink(trained, tmp_path / "w")
  monkeypatch.chdir(tmp_path)
  code, _, err = run(capsys, "eval", "--checkpoint", "w", "--out", "e", "--conventions", "none")
  assert code == 0, err
  assert json.loads((tmp_path / "e" / "metrics.json").read_text())["checkpoint"] == "w"
  for name in ("metrics.json", "report.md"):
    text = (tmp_path / "e" / name).read_text()
    assert str(tmp_path) not in text and str(trained) not in text, name
  # An absolute path under the working directory is recorded relative to it; others as given.
  name = lambda path: cli._weights_name(argparse.Namespace(checkpoint=path, init=None))
  assert name(str(tmp_path / "w" / "best")) == os.path.join("w", "best")
  assert name("w/") == "w" and name("/elsewhere/w") == "/elsewhere/w"
