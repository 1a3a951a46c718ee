"""VAN backbone and FCNHead against small PyTorch references written here (no timm / mmseg).

The torch modules below use the attribute names of the official code (VAN-Segmentation / MIML's
dass.py and mmseg's FCNHead + mmcv ConvModule), so their state_dicts have the official keys; they
are converted with `convert.state_dict_to_variables(strict=True)` and both sides run on the same
input. Every BatchNorm / LayerNorm affine and running statistic and every layer scale is set to
random values first, so a swapped or ignored tensor shows. The full DASS VAN (VAN-B5) is only
traced with jax.eval_shape. Models run un-jitted (op by op) to avoid CPU compiles.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tnn = torch.nn

from miml_jax import models
from miml_jax.models import (
  convert,
  naming,
  van,
)
from miml_jax.models.fcn import FCNHead
from torch_export import to_torch_layout, variables_to_state_dict

TOL = 1e-4


@pytest.fixture(autouse=True)
def _fp32_highest():
  """fp32 torch, 'highest' jax matmul / conv precision; both restored afterwards."""
  old = torch.get_default_dtype()
  torch.set_default_dtype(torch.float32)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------
# PyTorch references (official attribute names, NCHW).


class _TorchDWConv(tnn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dwconv = tnn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

  def forward(self, x):
    return self.dwconv(x)


class _TorchMlp(tnn.Module):
  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = tnn.Conv2d(dim, hidden, 1)
    self.dwconv = _TorchDWConv(hidden)
    self.act = tnn.GELU()
    self.fc2 = tnn.Conv2d(hidden, dim, 1)

  def forward(self, x):
    return self.fc2(self.act(self.dwconv(self.fc1(x))))


class _TorchLKA(tnn.Module):
  def __init__(self, dim):
    super().__init__()
    self.conv0 = tnn.Conv2d(dim, dim, 5, padding=2, groups=dim)
    self.conv_spatial = tnn.Conv2d(dim, dim, 7, padding=9, dilation=3, groups=dim)
    self.conv1 = tnn.Conv2d(dim, dim, 1)

  def forward(self, x):
    return x * self.conv1(self.conv_spatial(self.conv0(x)))


class _TorchAttention(tnn.Module):
  def __init__(self, dim):
    super().__init__()
    self.proj_1 = tnn.Conv2d(dim, dim, 1)
    self.activation = tnn.GELU()
    self.spatial_gating_unit = _TorchLKA(dim)
    self.proj_2 = tnn.Conv2d(dim, dim, 1)

  def forward(self, x):
    y = self.proj_2(self.spatial_gating_unit(self.activation(self.proj_1(x))))
    return y + x


class _TorchBlock(tnn.Module):
  def __init__(self, dim, mlp_ratio):
    super().__init__()
    self.norm1 = tnn.BatchNorm2d(dim)
    self.attn = _TorchAttention(dim)
    self.norm2 = tnn.BatchNorm2d(dim)
    self.mlp = _TorchMlp(dim, int(dim * mlp_ratio))
    self.layer_scale_1 = tnn.Parameter(1e-2 * torch.ones(dim))
    self.layer_scale_2 = tnn.Parameter(1e-2 * torch.ones(dim))

  def forward(self, x):
    x = x + self.layer_scale_1[:, None, None] * self.attn(self.norm1(x))
    return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class _TorchPatchEmbed(tnn.Module):
  def __init__(self, cin, dim, k, stride):
    super().__init__()
    self.proj = tnn.Conv2d(cin, dim, k, stride=stride, padding=k // 2)
    self.norm = tnn.BatchNorm2d(dim)

  def forward(self, x):
    return self.norm(self.proj(x))


class _TorchVAN(tnn.Module):
  def __init__(self, in_chans, dims, depths, ratios):
    super().__init__()
    for i in range(4):
      cin = in_chans if i == 0 else dims[i - 1]
      setattr(
        self,
        f"patch_embed{i + 1}",
        _TorchPatchEmbed(cin, dims[i], 7 if i == 0 else 3, 4 if i == 0 else 2),
      )
      setattr(
        self,
        f"block{i + 1}",
        tnn.ModuleList([_TorchBlock(dims[i], ratios[i]) for _ in range(depths[i])]),
      )
      setattr(self, f"norm{i + 1}", tnn.LayerNorm(dims[i]))  # eps 1e-5, as in dass.py.

  def forward(self, x):
    outs = []
    for i in range(1, 5):
      x = getattr(self, f"patch_embed{i}")(x)
      for blk in getattr(self, f"block{i}"):
        x = blk(x)
      b, c, h, w = x.shape
      x = getattr(self, f"norm{i}")(x.flatten(2).transpose(1, 2))
      x = x.transpose(1, 2).reshape(b, c, h, w)
      outs.append(x)
    return outs


class _TorchConvModule(tnn.Module):
  def __init__(self, cin, cout, k, padding, dilation=1):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, bias=False)
    self.bn = tnn.BatchNorm2d(cout)
    self.activate = tnn.ReLU()

  def forward(self, x):
    return self.activate(self.bn(self.conv(x)))


class _TorchFCNHead(tnn.Module):
  def __init__(self, cin, channels, num_convs, concat_input, k, dilation, num_classes):
    super().__init__()
    convs = [
      _TorchConvModule(cin if i == 0 else channels, channels, k, (k // 2) * dilation, dilation)
      for i in range(num_convs)
    ]
    self.convs = tnn.Sequential(*convs) if convs else tnn.Identity()
    self.concat_input = concat_input
    if concat_input:
      self.conv_cat = _TorchConvModule(cin + channels, channels, k, k // 2)
    self.dropout = tnn.Dropout2d(0.1)
    self.conv_seg = tnn.Conv2d(channels, num_classes, 1)

  def forward(self, x):
    feats = self.convs(x)
    if self.concat_input:
      feats = self.conv_cat(torch.cat([x, feats], dim=1))
    return self.conv_seg(self.dropout(feats))


def _randomize(module, seed):
  """Non-trivial values for every norm affine / running stat and layer scale."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, (tnn.BatchNorm2d, tnn.LayerNorm)):
        n = m.weight.shape[0]
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.3 * torch.randn(n, generator=g))
      if isinstance(m, tnn.BatchNorm2d):
        m.running_mean.copy_(0.3 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
      if isinstance(m, _TorchBlock):
        for p in (m.layer_scale_1, m.layer_scale_2):
          p.copy_(0.2 + 0.6 * torch.rand(p.shape[0], generator=g))
  return module


def _convert(tmodel, fmodel, x_nhwc):
  """torch state_dict -> flax variables (strict), with the bookkeeping checked."""
  sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  target = jax.eval_shape(lambda: fmodel.init(jax.random.PRNGKey(0), x_nhwc, train=False))
  variables, report = convert.state_dict_to_variables(sd, target, strict=True)
  n_bn = sum(isinstance(m, tnn.BatchNorm2d) for m in tmodel.modules())
  assert report.ignored == n_bn  # num_batches_tracked
  assert report.converted == len(sd) - n_bn
  assert not (report.unmapped or report.missing or report.mismatched)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(dict(target))
  # And back: the official keys, bit-exact values.
  back = variables_to_state_dict(variables)
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  return variables


def _max_err(t, f):
  return float(np.max(np.abs(t.detach().numpy().transpose(0, 2, 3, 1) - np.asarray(f))))


# ---------------------------------------------------------------------------------------------
# VAN parity.

TINY_DIMS, TINY_DEPTHS, TINY_RATIOS = (8, 16, 24, 32), (1, 1, 2, 1), (4, 4, 2, 2)


@pytest.mark.parametrize("in_chans", [3, 9])
def test_van_matches_torch(in_chans):
  torch.manual_seed(in_chans)
  tmodel = _randomize(_TorchVAN(in_chans, TINY_DIMS, TINY_DEPTHS, TINY_RATIOS), in_chans).eval()
  fmodel = van.VAN(TINY_DIMS, TINY_DEPTHS, TINY_RATIOS, in_chans=in_chans)
  # The stage LayerNorms' eps (1e-5 vs the classification VAN's 1e-6) moves these outputs by
  # under 1e-4 only, so it is checked directly.
  assert fmodel.ln_eps == tmodel.norm1.eps == 1e-5
  x = torch.randn(2, in_chans, 64, 64)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  variables = _convert(tmodel, fmodel, x_nhwc)

  with torch.no_grad():
    t_outs = tmodel(x)
  f_outs = fmodel.apply(variables, x_nhwc, train=False)
  assert [o.shape for o in f_outs] == [
    (2, 64 // s, 64 // s, d) for s, d in zip((4, 8, 16, 32), TINY_DIMS)
  ]
  errs = [_max_err(t, f) for t, f in zip(t_outs, f_outs)]
  assert max(errs) < TOL, errs

  if in_chans == 3:
    # Training mode: batch statistics, and the same running-stat update as torch (momentum 0.1,
    # unbiased variance).
    tmodel.train()
    with torch.no_grad():
      t_outs = tmodel(x)
    f_outs, updates = fmodel.apply(variables, x_nhwc, train=True, mutable=["batch_stats"])
    errs = [_max_err(t, f) for t, f in zip(t_outs, f_outs)]
    assert max(errs) < TOL, errs
    t_sd = tmodel.state_dict()
    flat = flax.traverse_util.flatten_dict(updates["batch_stats"])
    stat_err = max(
      float(
        np.max(
          np.abs(
            to_torch_layout(path, np.asarray(v))
            - t_sd[naming.flax_path_to_torch_key("batch_stats", path)].numpy()
          )
        )
      )
      for path, v in flat.items()
    )
    assert stat_err < TOL, stat_err


# ---------------------------------------------------------------------------------------------
# FCNHead parity.


@pytest.mark.parametrize(
  "num_convs,concat_input,dilation", [(1, False, 1), (2, True, 2), (0, True, 1)]
)
def test_fcn_head_matches_torch(num_convs, concat_input, dilation):
  cin, channels = (12, 12) if num_convs == 0 else (12, 8)
  torch.manual_seed(num_convs)
  tmodel = _randomize(
    _TorchFCNHead(cin, channels, num_convs, concat_input, 3, dilation, 2), num_convs
  ).eval()
  fmodel = FCNHead(
    channels=channels,
    num_convs=num_convs,
    concat_input=concat_input,
    dilation=dilation,
    num_classes=2,
    dropout=0.1,
  )
  x = torch.randn(2, cin, 9, 11)
  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  variables = _convert(tmodel, fmodel, x_nhwc)
  with torch.no_grad():
    t_out = tmodel(x)
  # A sequence input picks in_index, as mmseg's _transform_inputs does.
  f_out = fmodel.apply(variables, (x_nhwc * 0, x_nhwc), train=False)
  assert f_out.shape == (2, 9, 11, 2)
  err = _max_err(t_out, f_out)
  assert err < TOL, err


def test_dass_auxiliary_head_keys():
  """DASS's auxiliary FCNHead (480 -> 256, one conv, no concat) has mmseg's key set."""
  head = FCNHead(channels=256, num_convs=1, concat_input=False, num_classes=2)
  shapes = jax.eval_shape(
    lambda: head.init(
      {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
      jnp.zeros((1, 8, 8, 480)),
      train=False,
    )
  )
  keys = naming.flax_tree_to_torch_keys(shapes)
  assert {k: v[2] for k, v in keys.items()} == {
    "convs.0.conv.weight": (256, 480, 3, 3),
    "convs.0.bn.weight": (256,),
    "convs.0.bn.bias": (256,),
    "convs.0.bn.running_mean": (256,),
    "convs.0.bn.running_var": (256,),
    "conv_seg.weight": (2, 256, 1, 1),
    "conv_seg.bias": (2,),
  }


# ---------------------------------------------------------------------------------------------
# The full-size DASS VAN (VAN-B5): tree only.

# MIML's DASS annotator: VAN-B5 (official dass.py: embed 96/192/480/768, depths 3/3/24/3, the
# default mlp ratios 8/8/4/4, drop_path_rate 0.4).
DASS_VAN_PRESET = "b5"
DASS_DROP_PATH_RATE = 0.4


@pytest.fixture(scope="module")
def dass_van_shapes():
  dims, depths, ratios = van.van_preset(DASS_VAN_PRESET)
  model = van.VAN(dims, depths, ratios, in_chans=9, drop_path_rate=DASS_DROP_PATH_RATE)
  return jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 9)), train=False)
  )


def test_dass_van_param_and_key_count(dass_van_shapes):
  assert van.VAN_PRESETS["b5"] == ((96, 192, 480, 768), (3, 3, 24, 3), (8, 8, 4, 4))
  n = models.count_params(dass_van_shapes)
  assert n == 89_226_912
  # With RGB input (6 * 49 * 96 fewer stem weights) and the 1000-class ImageNet head
  # (768 * 1000 + 1000), this is the published VAN-B5 size: 89.97 M (mmpretrain's metafile
  # for the converted official weights).
  rgb_with_head = n - 6 * 7 * 7 * 96 + 768 * 1000 + 1000
  assert round(rgb_with_head / 1e6, 2) == 89.97

  keys = naming.flax_tree_to_torch_keys(dass_van_shapes)
  # Per block: 22 params (norm1 2, proj_1 2, conv0 2, conv_spatial 2, conv1 2, proj_2 2,
  # norm2 2, fc1 2, dwconv 2, fc2 2, layer scales 2) and 4 running stats (norm1, norm2);
  # per stage: patch_embed proj 2 + norm 2 params, 2 running stats, and norm{i} 2 params.
  n_blocks = sum(van.VAN_PRESETS["b5"][1])
  n_params = n_blocks * 22 + 4 * 6
  n_stats = n_blocks * 4 + 4 * 2
  assert (n_params, n_stats) == (750, 140)
  assert sum(c == "params" for c, _, _ in keys.values()) == n_params
  assert len(keys) == n_params + n_stats == 890
  # torch's state_dict also holds one num_batches_tracked per BatchNorm (2 * 33 + 4 = 70).
  assert sum(k.endswith(".running_mean") for k in keys) == 70


def test_dass_van_naming_round_trip(dass_van_shapes):
  keys = naming.flax_tree_to_torch_keys(dass_van_shapes)
  norms = naming.norm_module_paths(dass_van_shapes)
  assert len(norms) == 70 + 4  # BatchNorms + stage LayerNorms.
  for key, (col, path, _) in keys.items():
    assert naming.torch_key_to_flax_path(key, norms) == (col, path), key
    assert naming.torch_key_to_flax_path(key) == (col, path), key
    assert naming.flax_path_to_torch_key(col, path) == key
  spot = {
    "patch_embed1.proj.weight": ("params", ("patch_embed1", "proj", "kernel"), (96, 9, 7, 7)),
    "patch_embed2.norm.weight": ("params", ("patch_embed2", "norm", "scale"), (192,)),
    "patch_embed2.norm.running_var": ("batch_stats", ("patch_embed2", "norm", "var"), (192,)),
    "block3.23.attn.proj_1.weight": (
      "params",
      ("block3_23", "attn", "proj_1", "kernel"),
      (480, 480, 1, 1),
    ),
    "block3.23.attn.proj_2.bias": ("params", ("block3_23", "attn", "proj_2", "bias"), (480,)),
    "block1.2.attn.spatial_gating_unit.conv_spatial.weight": (
      "params",
      ("block1_2", "attn", "spatial_gating_unit", "conv_spatial", "kernel"),
      (96, 1, 7, 7),
    ),
    "block4.0.mlp.dwconv.dwconv.weight": (
      "params",
      ("block4_0", "mlp", "dwconv", "dwconv", "kernel"),
      (3072, 1, 3, 3),
    ),
    "block4.0.mlp.fc1.weight": ("params", ("block4_0", "mlp", "fc1", "kernel"), (3072, 768, 1, 1)),
    "block2.1.layer_scale_2": ("params", ("block2_1", "layer_scale_2"), (192,)),
    "block2.1.norm1.running_mean": ("batch_stats", ("block2_1", "norm1", "mean"), (192,)),
    "norm4.weight": ("params", ("norm4", "scale"), (768,)),
  }
  for key, want in spot.items():
    assert keys[key] == want, key


def test_naming_names_ending_in_digits():
  """Torch names like `proj_1` stay whole; indices after them, and other names, still split."""
  to_torch = naming.flax_module_path_to_torch
  assert to_torch(("block1_0", "attn", "proj_1")) == ("block1", "0", "attn", "proj_1")
  assert to_torch(("proj_2_3_1",)) == ("proj_2", "3", "1")
  assert to_torch(("proj_3",)) == ("proj", "3")
  assert to_torch(("stages_2_11", "proj_1x")) == ("stages", "2", "11", "proj_1x")
  for key in (
    "a.proj_1.0.weight",
    "block1.0.attn.proj_2.bias",
    "block1.0.layer_scale_1",
    "head.proj.3.weight",
  ):
    col, path = naming.torch_key_to_flax_path(key)
    assert naming.flax_path_to_torch_key(col, path) == key
