"""Weight conversion: official key names in, flax trees out, strictly; init files; bad files."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from miml_jax import config as config_lib
from miml_jax import models
from miml_jax.errors import UserInputError
from miml_jax.models import convert, naming
from torch_export import variables_to_state_dict

APSC_NET_CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "apsc_net.py")
TINY_MODEL = dict(
  name="web_iml",
  backbone=dict(preset=None, dims=(8, 16, 16, 16), depths=(1, 1, 1, 1)),
  head=dict(
    channels=8,
    feat0_channels=8,
    c1_channels=4,
    kernel_size=3,
    kernel_gen_size=16,
    kernel_gen_dims=(4, 4, 4, 4, 4),
    image_head_dims=(8, 8, 8),
    rectify_passes=2,
  ),
)


def _config(**model):
  return ml_collections.ConfigDict({"model": {**TINY_MODEL, **model}})


@pytest.fixture(scope="module")
def tiny():
  config = _config()
  model = models.build_model(config.model)
  variables = jax.device_get(models.init_variables(model, config, jax.random.PRNGKey(0)))
  # Non-trivial BN statistics, so a mix-up between mean and var would show.
  variables = jax.tree_util.tree_map(lambda x: x + np.float32(0.5) if x.ndim == 1 else x, variables)
  return config, model, variables


def _assert_trees_equal(a, b):
  fa = dict(jax.tree_util.tree_leaves_with_path(a))
  fb = dict(jax.tree_util.tree_leaves_with_path(b))
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def test_state_dict_round_trip_is_exact(tiny):
  _, _, variables = tiny
  state_dict = variables_to_state_dict(variables)
  bn = [k for k in state_dict if k.endswith("num_batches_tracked")]
  assert bn and all(k.rsplit(".", 1)[0] + ".running_var" in state_dict for k in bn)
  # Torch layouts: a conv weight is (O, I, kh, kw), a Linear (out, in).
  assert state_dict["backbone.downsample_layers.0.0.weight"].shape[2:] == (4, 4)
  back, report = convert.state_dict_to_variables(state_dict, variables)
  assert report.converted == len(jax.tree_util.tree_leaves(variables))
  assert report.ignored == len(bn) and not report.unmapped and not report.missing
  _assert_trees_equal(back, variables)


@pytest.mark.parametrize("wrap", ["module", "state_dict", "backbone_only"])
def test_prefixes_are_aligned(tiny, wrap):
  _, _, variables = tiny
  state_dict = variables_to_state_dict(variables)
  if wrap == "module":
    back, report = convert.state_dict_to_variables(
      {"module." + k: v for k, v in state_dict.items()}, variables
    )
    assert report.prefix == "strip 'module.'"
    _assert_trees_equal(back, variables)
  elif wrap == "state_dict":
    # A segmentor checkpoint into a bare backbone: 'backbone.' is stripped, the head unmapped.
    bare = {"params": variables["params"]["backbone"]}
    back, report = convert.state_dict_to_variables(state_dict, bare, strict=False)
    assert report.prefix == "strip 'backbone.'" and not report.missing
    assert all(k.startswith("decode_head.") for k in report.unmapped)
    _assert_trees_equal(back, {"params": variables["params"]["backbone"], "batch_stats": {}})
    with pytest.raises(UserInputError, match="unmapped"):
      convert.state_dict_to_variables(state_dict, bare)
  else:
    # A FAIR backbone checkpoint (no prefix, with its classifier) into the segmentor.
    backbone = {
      k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
    }
    backbone["head.weight"] = np.zeros((1000, 16), np.float32)
    back, report = convert.state_dict_to_variables(backbone, variables, strict=False)
    assert report.prefix == "add 'backbone.'" and report.unmapped == ["head.weight"]
    assert all(k.startswith("decode_head.") for k in report.missing)
    _assert_trees_equal(back["params"]["backbone"], variables["params"]["backbone"])


def test_strict_errors_name_the_keys(tiny):
  _, _, variables = tiny
  state_dict = variables_to_state_dict(variables)
  extra = {**state_dict, "decode_head.conv_seg.extra": np.zeros(3, np.float32)}
  with pytest.raises(UserInputError, match=r"weights\.pth.*1 unmapped.*conv_seg\.extra"):
    convert.state_dict_to_variables(extra, variables, source="weights.pth")
  missing = dict(state_dict)
  del missing["decode_head.MSDEC.conv_seg.bias"]
  with pytest.raises(UserInputError, match=r"1 missing.*MSDEC\.conv_seg\.bias"):
    convert.state_dict_to_variables(missing, variables)
  wrong = {**state_dict, "decode_head.conv_seg.weight": np.zeros((150, 8, 1, 1), np.float32)}
  with pytest.raises(UserInputError, match=r"mismatched.*\(150, 8, 1, 1\) vs \(2, 8, 1, 1\)"):
    convert.state_dict_to_variables(wrong, variables)
  # Partial: an ADE20k head with 150 classes converts everything but the classifier.
  back, report = convert.state_dict_to_variables(wrong, variables, strict=False)
  assert report.mismatched and not report.missing and not report.unmapped
  assert report.converted == len(jax.tree_util.tree_leaves(variables)) - 1
  with pytest.raises(UserInputError, match="no tensor matches"):
    convert.state_dict_to_variables({"fc.weight": np.zeros((2, 2))}, variables, strict=False)


def test_apsc_net_official_key_set_converts_totally():
  """The full APSC-Net of experiments/apsc_net.py: 578 tensors with the official names (544 +
  34 num_batches_tracked)."""
  config = config_lib.load_config(APSC_NET_CONFIG)
  model = models.build_model(config.model)
  abstract = models.abstract_variables(model, config)
  wanted = naming.flax_tree_to_torch_keys(abstract)
  # Zero-stride arrays: the official shapes without 573 MB of memory.
  state_dict = {k: np.broadcast_to(np.float32(0.25), shape) for k, (_, _, shape) in wanted.items()}
  state_dict.update(
    {
      k.rsplit(".", 1)[0] + ".num_batches_tracked": np.zeros((), np.int64)
      for k in wanted
      if k.endswith(".running_mean")
    }
  )
  assert len(state_dict) == 578
  assert (
    sum(
      int(np.prod(v.shape))
      for k, v in state_dict.items()
      if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    == 143_127_136
  )
  variables, report = convert.state_dict_to_variables(state_dict, abstract)
  assert (report.converted, report.ignored) == (544, 34)
  assert report.prefix == "none" and not (report.unmapped or report.missing or report.mismatched)
  kernel = variables["params"]["decode_head"]["ha"]["kg_9"]["kernel"]
  assert kernel.shape == (512, 961) and kernel.dtype == np.float32


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_files_and_init_file_round_trip(tiny, tmp_path, fmt):
  config, model, variables = tiny
  state_dict = variables_to_state_dict(variables)
  path = str(tmp_path / f"weights.{fmt}")
  if fmt == "npz":
    np.savez(path, **state_dict)
  elif fmt == "safetensors":
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
  else:
    torch = pytest.importorskip("torch")
    # As training scripts save them: wrapped, DDP-prefixed, with num_batches_tracked.
    torch.save(
      {
        "state_dict": {"module." + k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
        "meta": {"epoch": 3},
      },
      path,
    )
  read = convert.read_state_dict(path)
  back, report = convert.state_dict_to_variables(read, variables, source=path)
  init_file = str(tmp_path / "init.msgpack")
  convert.save_init_file(init_file, back, config.model, source=path, report=report)
  loaded, missing = models.load(model, config, init_file)
  assert missing == []
  _assert_trees_equal(loaded, variables)


def test_bad_files_are_named(tiny, tmp_path):
  config, model, variables = tiny
  with pytest.raises(UserInputError, match="nothere.pth: no such file"):
    convert.read_state_dict(str(tmp_path / "nothere.pth"))
  text = tmp_path / "weights.txt"
  text.write_text("hello")
  with pytest.raises(UserInputError, match="weights.txt: unknown weight format"):
    convert.read_state_dict(str(text))
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file")
  with pytest.raises(UserInputError, match="garbage.npz: cannot read weights"):
    convert.read_state_dict(str(garbage))
  with pytest.raises(UserInputError, match="garbage.npz: not a miml-jax init file"):
    models.load(model, config, str(garbage))
  # An init file of another model, or of this model with other shapes.
  other = str(tmp_path / "other.msgpack")
  convert.save_init_file(other, variables, {"name": "apsc_net"})
  with pytest.raises(UserInputError, match="weights of model 'apsc_net'.*builds 'web_iml'"):
    models.load(model, config, other)
  mine = str(tmp_path / "tiny.msgpack")
  convert.save_init_file(mine, variables, config.model)
  wider = _config(head={**TINY_MODEL["head"], "channels": 16})
  with pytest.raises(UserInputError, match=r"tiny.msgpack: (params|batch_stats)/.* has shape"):
    models.load(models.build_model(wider.model), wider, mine)
  partial = str(tmp_path / "partial.msgpack")
  convert.save_init_file(
    partial, {"params": {"backbone": variables["params"]["backbone"]}}, config.model
  )
  with pytest.raises(UserInputError, match="lacks .* --partial"):
    models.load(model, config, partial)
  loaded, missing = models.load(model, config, partial, partial=True, init_variables=variables)
  assert missing and all("decode_head" in m for m in missing)


def test_ade20k_upernet_checkpoint_initialises_apsc_net():
  """The FAIR UPerNet-ConvNeXt-B ADE20k key set (backbone, UPerHead with 150 classes, FCN
  auxiliary head) into APSC-Net with --partial: the whole backbone and the head layers APSC-Net
  shares with UPerHead convert; the rest is reported, none of it silently."""
  import flax.linen as nn

  from miml_jax.models import convnext, fcn, upernet

  class UPerNetADE20k(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      feats = convnext.ConvNeXt(*convnext.CONVNEXT_PRESETS["base"], name="backbone")(x, train)
      upernet.UPerHead(512, num_classes=150, name="decode_head")(feats, train)
      return fcn.FCNHead(
        256, num_convs=1, concat_input=False, num_classes=150, in_index=2, name="auxiliary_head"
      )(feats, train)

  ade = jax.eval_shape(
    lambda: UPerNetADE20k().init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3)), train=False)
  )
  wanted = naming.flax_tree_to_torch_keys(ade)
  state_dict = {k: np.broadcast_to(np.float32(0.5), s) for k, (_, _, s) in wanted.items()}
  config = config_lib.load_config(APSC_NET_CONFIG)
  target = models.abstract_variables(models.build_model(config.model), config)
  variables, report = convert.state_dict_to_variables(state_dict, target, strict=False)
  assert report.prefix == "none"
  assert variables["params"]["backbone"].keys() == target["params"]["backbone"].keys()
  shared = set(ade["params"]["decode_head"]) - {"fpn_bottleneck", "conv_seg"}
  assert len(shared) == 4 + 1 + 3 + 3  # psp_modules_{0..3}_1, bottleneck, laterals, fpn convs
  assert shared <= set(variables["params"]["decode_head"])
  assert {k.split(".")[0] for k in report.unmapped} == {"decode_head", "auxiliary_head"}
  # The 150-class classifier cannot initialise APSC-Net's 2-class aux classifier.
  assert sorted(m.split(":")[0] for m in report.mismatched) == [
    "decode_head.conv_seg.bias",
    "decode_head.conv_seg.weight",
  ]
  assert all(k.startswith("decode_head.") for k in report.missing)
