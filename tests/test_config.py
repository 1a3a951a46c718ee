import os

import pytest

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")


def test_quickstart_loads_and_overrides_propagate():
  config = config_lib.load_config(QUICKSTART)
  config_lib.apply_overrides(config, ["train.steps=7", "optim.lr=1", "model.head.fusion=sum",
                                      "model.backbone.dims=(8,16,32,64)"])
  assert config.train.steps == 7
  # optim.total_steps is tied to train.steps by a FieldReference.
  assert config.optim.total_steps == 7
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.model.head.fusion == "sum"
  assert tuple(config.model.backbone.dims) == (8, 16, 32, 64)


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "no config key 'train.stepz'"),
    ("nope.steps=3", "no config key 'nope'"),
    ("train.steps", "expected --config.KEY=VALUE"),
    ("train.steps=abc", "train.steps=abc"),
])
def test_bad_overrides_name_the_key(override, message):
  config = config_lib.load_config(QUICKSTART)
  with pytest.raises(UserInputError, match=message):
    config_lib.apply_overrides(config, [override])


def test_missing_and_broken_config_files(tmp_path):
  with pytest.raises(UserInputError, match="config file not found"):
    config_lib.load_config(str(tmp_path / "none.py"))
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n")
  with pytest.raises(UserInputError, match="broken.py: cannot load config"):
    config_lib.load_config(str(broken))
  empty = tmp_path / "empty.py"
  empty.write_text("x = 1\n")
  with pytest.raises(UserInputError, match="defines no get_config"):
    config_lib.load_config(str(empty))


def test_config_argument_is_passed(tmp_path):
  path = tmp_path / "arg.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg=None):\n"
                  "  return ml_collections.ConfigDict({'arg': arg or 'none'})\n")
  assert config_lib.load_config(f"{path}:big").arg == "big"
  assert config_lib.load_config(str(path)).arg == "none"
