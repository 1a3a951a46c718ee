import os

import pytest

from miml_jax import config as config_lib
from miml_jax.errors import UserInputError

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")


def test_quickstart_loads_and_overrides_propagate():
  config = config_lib.load_config(QUICKSTART)
  config_lib.apply_overrides(
    config,
    ["train.steps=7", "optim.lr=1", "model.head.fusion=sum", "model.backbone.dims=(8,16,32,64)"],
  )
  assert config.train.steps == 7
  # optim.total_steps is tied to train.steps by a FieldReference.
  assert config.optim.total_steps == 7
  assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
  assert config.model.head.fusion == "sum"
  assert tuple(config.model.backbone.dims) == (8, 16, 32, 64)


@pytest.mark.parametrize(
  "override, message",
  [
    ("train.stepz=3", "no config key 'train.stepz'"),
    ("nope.steps=3", "no config key 'nope'"),
    ("train.steps", "expected --config.KEY=VALUE"),
    ("train.steps=abc", "train.steps=abc"),
  ],
)
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
  path.write_text(
    "import ml_collections\n"
    "def get_config(arg=None):\n"
    "  return ml_collections.ConfigDict({'arg': arg or 'none'})\n"
  )
  assert config_lib.load_config(f"{path}:big").arg == "big"
  assert config_lib.load_config(str(path)).arg == "none"


# ---- validate -----------------------------------------------------------------------------

import dataclasses  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402

import ml_collections  # noqa: E402

from miml_jax import losses, optim, sharding, tasks  # noqa: E402
from miml_jax.input import pairs  # noqa: E402
from miml_jax.input.instance_forgery import InstanceForgeryConfig  # noqa: E402
from miml_jax.input.object_jitter import ObjectJitterConfig  # noqa: E402
from miml_jax.input.transforms import AugmentConfig  # noqa: E402

# Experiments are the files with a get_config (not shared helpers such as common.py).
EXPERIMENTS = [
  path
  for path in sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py"))
  )
  if "def get_config" in open(path).read()
]
DELETE = object()


def _load_variant(path, variant):
  spec = f"{path}:{variant}" if variant else path
  try:
    return config_lib.load_config(spec)
  except UserInputError as e:
    if variant and "unknown variant" in str(e):
      pytest.skip(f"{os.path.basename(path)} has no '{variant}' variant")
    raise


def _assert_kept(given, got, key="config"):
  """Every key of `given` is in `got` with an equal value (lists and tuples alike)."""
  if isinstance(given, dict):
    assert isinstance(got, dict), key
    for name, value in given.items():
      assert name in got, f"{key}.{name} dropped"
      _assert_kept(value, got[name], f"{key}.{name}")
  elif isinstance(given, (list, tuple)):
    assert isinstance(got, (list, tuple)) and len(got) == len(given), key
    for i, (a, b) in enumerate(zip(given, got)):
      _assert_kept(a, b, f"{key}[{i}]")
  else:
    assert got == given and type(got) in (type(given), float), (key, given, got)


@pytest.mark.parametrize("variant", ["", "tiny"])
@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_config_validates_and_keeps_its_values(path, variant):
  config = _load_variant(path, variant)
  # Each task has its own loss section; the segmentation one is validate's default.
  loss_schema = tasks.task_class(config).loss_schema
  checked = config_lib.validate(config, loss_schema=loss_schema)
  assert isinstance(checked, ml_collections.ConfigDict)
  _assert_kept(config.to_dict(), checked.to_dict())
  # Unchecked: the model section is the model builders' and comes back as given.
  assert checked.model.to_dict() == config.model.to_dict()
  # A saved config.json (lists for tuples) validates to the same config, and so does the result.
  saved = json.loads(config_lib.to_json(config))
  again = config_lib.validate(saved, loss_schema=loss_schema)
  assert config_lib.to_json(again) == config_lib.to_json(checked)
  again = config_lib.validate(checked, loss_schema=loss_schema)
  assert config_lib.to_json(again) == config_lib.to_json(checked)


def _quickstart(**changes):
  """The quickstart config as a dict with `changes` ({'a.b': value or DELETE}) applied."""
  config = config_lib.load_config(QUICKSTART).to_dict()
  for key, value in changes.items():
    node, parts = config, key.split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    if value is DELETE:
      node.pop(parts[-1], None)
    else:
      node[parts[-1]] = value
  return config


OPTIONAL = [
  "task",
  "model_init",
  "mesh",
  "data.on_error",
  "data.object_jitter",
  "data.instance_forgery",
  "data.spg",
  "data.pair_synth",
  "input.read_threads",
  "input.prefetch_batches",
  "loss.dice_weight",
  "loss.ohem_thresh",
  "loss.ohem_min_kept",
  "train.best_metric",
  "train.keep_best",
  "train.tensorboard",
  "train.peak_flops_per_device",
  "eval.conventions",
  "eval.pad_multiple",
]


def test_validate_fills_the_defaults_of_absent_optional_keys():
  # As a workdir's config.json written before these keys existed.
  old = _quickstart(**dict.fromkeys(OPTIONAL, DELETE))
  checked = config_lib.validate(ml_collections.ConfigDict(old))
  # No task: the model's registered one (tasks.task_name), which a default would override.
  assert checked.task is None and tasks.task_name(checked) == "segmentation"
  assert checked.model_init is None
  assert checked.mesh.to_dict() == {
    "data": -1,
    "fsdp": 1,
    "fsdp_min_size": sharding.DEFAULT_FSDP_MIN_SIZE,
  }
  assert checked.data.on_error == "raise"
  assert checked.data.object_jitter.to_dict() == dataclasses.asdict(ObjectJitterConfig())
  assert checked.data.instance_forgery.to_dict() == dataclasses.asdict(InstanceForgeryConfig())
  assert checked.data.spg.to_dict() == dataclasses.asdict(pairs.SPGConfig())
  assert checked.data.pair_synth.to_dict() == dataclasses.asdict(pairs.PairSynthConfig())
  assert (checked.input.read_threads, checked.input.prefetch_batches) == (16, 16)
  assert (checked.loss.dice_weight, checked.loss.ohem_thresh, checked.loss.ohem_min_kept) == (
    0.0,
    0.7,
    100_000,
  )
  assert (
    checked.train.best_metric,
    checked.train.keep_best,
    checked.train.tensorboard,
    checked.train.peak_flops_per_device,
  ) == ("", 1, True, 0.0)
  assert (checked.eval.conventions, checked.eval.pad_multiple) == ("all", 32)
  # Code reads them directly now.
  assert checked.data.object_jitter.min_side == ObjectJitterConfig().min_side
  # A partial settings section keeps what it gives and gets the rest.
  partial = config_lib.validate(
    _quickstart(**{"data.object_jitter": {"min_side": 4}, "input.augment": {"crop_size": 64}})
  )
  assert partial.data.object_jitter.to_dict() == dataclasses.asdict(ObjectJitterConfig(min_side=4))
  assert partial.input.augment.to_dict() == dataclasses.asdict(AugmentConfig(crop_size=64))


def test_validate_normalises_types():
  checked = config_lib.validate(
    _quickstart(
      **{
        "optim.lr": 1,
        "loss.weights": [1, 0.5],
        "input.augment.resize_range": [1, 2],
        "eval.conventions": ["fixed_0.5", "best_per_image"],
        "model_init": "w.msgpack",
      }
    )
  )
  assert checked.optim.lr == 1.0 and isinstance(checked.optim.lr, float)
  assert checked.loss.weights == (1.0, 0.5) and isinstance(checked.loss.weights[0], float)
  assert checked.input.augment.resize_range == (1.0, 2.0)
  assert checked.eval.conventions == ("fixed_0.5", "best_per_image")
  assert checked.model_init == "w.msgpack"
  # The copy is independent of what it was made from.
  config = config_lib.load_config(QUICKSTART)
  config_lib.validate(config).train.steps = 1
  assert config.train.steps == 300


UNKNOWN_KEYS = [
  "lr",
  "data.trian",
  "input.batchsize",
  "input.augment.hflp",
  "loss.ohem_tresh",
  "optim.learning_rate",
  "mesh.model",
  "train.log_evry",
  "eval.treshold",
  "data.object_jitter.min_sid",
  "data.instance_forgery.min_are",
  "data.spg.min_sid",
  "data.pair_synth.swap",
]


@pytest.mark.parametrize("key", UNKNOWN_KEYS)
def test_unknown_key_in_each_section(key):
  with pytest.raises(UserInputError) as error:
    config_lib.validate(_quickstart(**{key: 1}))
  message = str(error.value)
  assert message.startswith(f"{key}: unknown key (known: ") and "\n" not in message
  assert "(known: " in message


@pytest.mark.parametrize(
  "key, value, message",
  [
    # Wrong types.
    ("loss.ohem_thresh", "high", "loss.ohem_thresh: expected a number, got 'high'"),
    ("seed", True, "seed: expected an int, got True"),
    ("input.batch_size", 8.0, "input.batch_size: expected an int, got 8.0"),
    ("train.tensorboard", 1, "train.tensorboard: expected a bool, got 1"),
    ("data.train", 3, "data.train: expected a string, got 3"),
    ("model_init", 3, "model_init: expected a string or None, got 3"),
    (
      "input.augment.resize_range",
      [1, 2, 3],
      "input.augment.resize_range: expected a list of 2 numbers, got [1, 2, 3]",
    ),
    (
      "input.augment.jpeg_quality",
      [50, 99.5],
      "input.augment.jpeg_quality[1]: expected an int, got 99.5",
    ),
    ("loss.weights", 0.5, "loss.weights: expected a list of numbers, got 0.5"),
    ("eval.conventions", 3, "eval.conventions: expected a string or a list of strings, got 3"),
    ("train", 3, "train: expected a section (dict), got 3"),
    ("model", "web_iml", "model: expected a section (dict), got 'web_iml'"),
    ("data.object_jitter", [], "data.object_jitter: expected a section (dict), got []"),
    # Out of range.
    ("input.batch_size", 0, "input.batch_size: expected >= 1, got 0"),
    ("input.num_workers", -1, "input.num_workers: expected >= 0, got -1"),
    ("input.read_threads", 0, "input.read_threads: expected >= 1, got 0"),
    ("input.prefetch_batches", 0, "input.prefetch_batches: expected >= 1, got 0"),
    ("train.steps", 0, "train.steps: expected >= 1, got 0"),
    ("train.log_every", 0, "train.log_every: expected >= 1, got 0"),
    ("train.checkpoint_every", 0, "train.checkpoint_every: expected >= 1, got 0"),
    ("train.eval_every", -1, "train.eval_every: expected >= 0, got -1"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints: expected >= 1, got 0"),
    ("eval.batch_size", 0, "eval.batch_size: expected >= 1, got 0"),
    ("eval.threshold", 1.5, "eval.threshold: expected a value in [0, 1], got 1.5"),
    ("eval.pad_multiple", 48, "eval.pad_multiple: expected a multiple of 32, got 48"),
    ("optim.lr", 0, "optim.lr: expected > 0, got 0.0"),
    ("optim.total_steps", 0, "optim.total_steps: expected >= 1, got 0"),
    ("optim.b2", 1.0, "optim.b2: expected a value in [0, 1), got 1.0"),
    ("data.image_size", 16, "data.image_size: expected >= 32, got 16"),
    ("input.augment.crop_size", 16, "input.augment.crop_size: expected >= 32, got 16"),
    ("input.augment.hflip", 1.5, "input.augment.hflip: expected a value in [0, 1], got 1.5"),
    (
      "input.augment.jpeg_quality",
      [90, 50],
      "input.augment.jpeg_quality: expected (min, max) with min <= max, got (90, 50)",
    ),
    ("mesh.fsdp", 0, "mesh.fsdp: expected a positive size or -1, got 0"),
    ("loss.weights", [], "loss.weights: expected at least one weight"),
    # The settings dataclasses' own checks, with the full key.
    (
      "data.object_jitter",
      {"blur_prob": 2.0},
      "data.object_jitter.blur_prob: expected a value in [0, 1], got 2.0",
    ),
    (
      "data.instance_forgery",
      {"scale_range": [0, 1]},
      "data.instance_forgery.scale_range: expected 0 < low <= high",
    ),
    # Not among the choices.
    ("train.nan_policy", "halt", "train.nan_policy: expected one of 'stop', 'skip', got 'halt'"),
    (
      "eval.threshold_policy",
      "otsu",
      "eval.threshold_policy: expected one of 'fixed', 'image_head', got 'otsu'",
    ),
    ("eval.resize", "bicubic", "eval.resize: expected one of 'none', 'miml', got 'bicubic'"),
    ("data.on_error", "ignore", "data.on_error: expected one of 'raise', 'skip', got 'ignore'"),
    ("eval.conventions", "fixed_0.5,nope", "eval.conventions: unknown convention(s) 'nope'"),
    ("loss.name", "focal", "loss.name: expected one of 'ohem', 'ce', got 'focal'"),
    (
      "optim.schedule",
      "step",
      "optim.schedule: expected one of 'poly', 'cosine', 'constant', got 'step'",
    ),
    ("optim.name", "sgd", "optim.name: expected one of 'adamw', got 'sgd'"),
    ("task", "detection", "task: expected one of 'segmentation', "),
    # Missing.
    ("train.steps", DELETE, "train.steps: missing (required)"),
    ("loss.image_weight", DELETE, "loss.image_weight: missing (required)"),
    ("input.augment", DELETE, "input.augment: missing (a required section)"),
    ("eval", DELETE, "eval: missing (a required section)"),
  ],
)
def test_errors_are_one_line_and_name_the_key(key, value, message):
  with pytest.raises(UserInputError) as error:
    config_lib.validate(_quickstart(**{key: value}))
  assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_choices_come_from_the_registries(monkeypatch):
  monkeypatch.setitem(optim.SCHEDULES, "step", optim.SCHEDULES["constant"])
  monkeypatch.setitem(losses.LOSSES, "ce2", losses.LOSSES["ce"])
  checked = config_lib.validate(_quickstart(**{"optim.schedule": "step", "loss.name": "ce2"}))
  assert (checked.optim.schedule, checked.loss.name) == ("step", "ce2")


def test_loss_section_follows_the_given_schema():
  @dataclasses.dataclass(frozen=True, kw_only=True)
  class PairLossConfig:
    weight: float = config_lib.setting(1.0, gt=0)

  checked = config_lib.validate(_quickstart(loss={"weight": 2}), loss_schema=PairLossConfig)
  assert checked.loss.to_dict() == {"weight": 2.0}
  assert config_lib.validate(_quickstart(loss={}), loss_schema=PairLossConfig).loss.weight == 1.0
  with pytest.raises(UserInputError, match=r"^loss\.\w+: unknown key \(known: weight\)$"):
    config_lib.validate(_quickstart(), loss_schema=PairLossConfig)


def test_settings_from_config_checks_types_too():
  assert AugmentConfig.from_config(None) == AugmentConfig()
  assert AugmentConfig.from_config({"resize_range": [1, 2]}).resize_range == (1.0, 2.0)
  with pytest.raises(UserInputError, match=r"^input\.augment\.crop_size: expected an int"):
    AugmentConfig.from_config({"crop_size": "big"})
  with pytest.raises(UserInputError, match=r"^object_jitter\.max_attempts: expected an int"):
    ObjectJitterConfig.from_config(ml_collections.ConfigDict({"max_attempts": True}))
