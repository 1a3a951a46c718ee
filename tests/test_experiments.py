"""Every experiment config loads and builds its model; the tiny variant of each paper-scale
recipe trains a few steps through `miml-jax train`, checkpoints, and its best checkpoint
evaluates to the trainer's own numbers."""

import glob
import json
import os

import pytest

from miml_jax import cli, models
from miml_jax import config as config_lib
from miml_jax.errors import UserInputError

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
# Experiments are the files with a get_config (not shared helpers such as common.py).
CONFIGS = sorted(
  p for p in glob.glob(os.path.join(EXPERIMENTS, "*.py")) if "def get_config" in open(p).read()
)
# Recipes too big for CI at full size, each with a ':tiny' variant of the same code paths.
PAPER_SCALE = {"apsc_net.py": 143.1, "web_iml_pod.py": 143.1}  # parameters, millions


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_builds(path):
  config = config_lib.load_config(path)
  model = models.build_model(config.model)
  params = models.count_params(models.abstract_variables(model, config)["params"]) / 1e6
  name = os.path.basename(path)
  if name in PAPER_SCALE:
    assert params == pytest.approx(PAPER_SCALE[name], abs=0.1)
    tiny = config_lib.load_config(path + ":tiny")
    assert tiny.model.name == config.model.name and tiny.model.dtype == config.model.dtype
    with pytest.raises(UserInputError, match="unknown variant"):
      config_lib.load_config(path + ":huge")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_SCALE))
def test_tiny_variant_trains_checkpoints_and_evaluates(name, tmp_path, capsys):
  workdir = tmp_path / "w"
  code = cli.main(
    [
      "train",
      "--config",
      os.path.join(EXPERIMENTS, name) + ":tiny",
      "--workdir",
      str(workdir),
      "--json",
    ]
  )
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  assert "step 3/3" in err
  assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "3"
  # The best checkpoint evaluates to the validation scores the trainer logged at its step.
  [best_step] = [int(name) for name in os.listdir(workdir / "best")]
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = {r["step"]: r for r in history if "val_iou" in r}
  assert logged[best_step]["val_iou"] == max(r["val_iou"] for r in logged.values())
  code = cli.main(["eval", "--checkpoint", str(workdir / "best"), "--json"])
  out, err = capsys.readouterr()
  assert code == 0, err[-3000:]
  result = json.loads(out)
  assert result["step"] == best_step
  for key in ("iou", "f1", "pixel_auc"):
    assert result["summary"][key] == pytest.approx(
      logged[best_step][f"val_{key}"], rel=1e-5, abs=1e-7
    )
