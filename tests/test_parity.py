"""PyTorch parity of the flax modules in miml_jax/models/.

Each test builds a small PyTorch reference module of miml_jax/torch_reference.py (an independent
restatement of the official code: FAIR/mmseg ConvNeXt, mmcv ConvModule /
DepthwiseSeparableConvModule, mmseg PPM and DepthwiseSeparableASPPHead, and APSC-Net's HeadAttn,
SCSEModule and TestRFB1HA1CLab head from the MIML repository), gives it random weights and
meaningful BatchNorm statistics, converts its state_dict with
`convert.state_dict_to_variables(..., strict=True)` and compares both forward passes in eval
mode (torch NCHW, flax NHWC) in float32: max abs error < 1e-4.

BatchNorm statistics are "calibrated": one train-mode torch pass with a cumulative average
records the real batch statistics of the test input (so activations stay O(1) through the
network instead of vanishing or exploding), then mean / var / weight / bias are perturbed randomly
so that BN parity is not a trivial identity.

The flax side runs jitted (one compile per module; on CPU that beats the op-by-op path, which
compiles a kernel per distinct op shape).
"""

import functools

import flax.linen as fnn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn as tnn

from miml_jax.models import (
  apsc_net,
  convert,
  convnext,
  deeplab,
  upernet,
)
from miml_jax.torch_reference import (
  TPSP,
  TAPSCHead,
  TBlock,
  TConvNeXt,
  THeadAttn,
  TLayerNorm,
  TSCSEModule,
  TSEFusion,
  TSepASPPHead,
  TUPerHead,
)

TOL = 1e-4
# Max abs error per compared output, printed at the end of the module (run with -s to see it).
MAX_ERRORS = {}


@pytest.fixture(scope="module", autouse=True)
def _float32_highest_precision():
  """float32 torch on few threads; jax matmuls / convs at 'highest' precision, then restored."""
  old_dtype, old_threads = torch.get_default_dtype(), torch.get_num_threads()
  torch.set_default_dtype(torch.float32)
  torch.set_num_threads(1)
  with jax.default_matmul_precision("highest"):
    yield
  torch.set_default_dtype(old_dtype)
  torch.set_num_threads(old_threads)
  if MAX_ERRORS:
    print("\nmax abs error per output:")
    for name, err in MAX_ERRORS.items():
      print(f"  {name}: {err:.3g}")


# ---------------------------------------------------------------------------------------------
# Helpers.


def nchw_to_nhwc(x):
  return np.transpose(x, (0, 2, 3, 1))


def to_torch(x_nhwc):
  """An NHWC numpy array as an NCHW float32 torch tensor."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2))))


def normal(rng, *shape, scale=1.0):
  return (rng.normal(size=shape) * scale).astype(np.float32)


@torch.no_grad()
def randomize_(model, *inputs, seed=0):
  """Random norm affines, layer scales and (calibrated, then perturbed) BN statistics."""
  g = torch.Generator().manual_seed(seed)
  bns = [m for m in model.modules() if isinstance(m, tnn.BatchNorm2d)]
  if bns:
    # momentum=None: cumulative average, so one pass records the true batch statistics.
    for bn in bns:
      bn.reset_running_stats()
      bn.momentum = None
    model.train()
    model(*inputs)
    for bn in bns:
      n = bn.num_features
      bn.running_mean.add_(0.1 * torch.randn(n, generator=g))
      bn.running_var.clamp_(min=1e-2).mul_(torch.empty(n).uniform_(0.7, 1.4, generator=g))
      bn.weight.uniform_(0.5, 1.5, generator=g)
      bn.bias.normal_(0.0, 0.2, generator=g)
      bn.momentum = 0.1
  for m in model.modules():
    if isinstance(m, TLayerNorm):
      m.weight.uniform_(0.5, 1.5, generator=g)
      m.bias.normal_(0.0, 0.2, generator=g)
    if isinstance(m, TBlock):
      m.gamma.uniform_(-1.0, 1.0, generator=g)
  model.eval()
  return model


def numpy_state_dict(torch_module):
  return {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}


def flax_target(flax_module, *args):
  return jax.eval_shape(lambda: flax_module.init(jax.random.PRNGKey(0), *args, train=False))


def convert_to_flax(flax_module, torch_module, *args):
  """torch_module's state_dict as variables of flax_module (strict), checking the report."""
  state_dict = numpy_state_dict(torch_module)
  variables, report = convert.state_dict_to_variables(
    state_dict, flax_target(flax_module, *args), strict=True
  )
  n_bn = sum(isinstance(m, tnn.BatchNorm2d) for m in torch_module.modules())
  assert report.prefix == "none"
  assert report.converted == len(state_dict) - n_bn
  assert report.ignored == n_bn  # the num_batches_tracked buffers
  return variables


def jit_apply(module, variables, *args, train=False):
  """module.apply under jit: one XLA compile beats op-by-op dispatch of many small shapes."""
  return jax.jit(functools.partial(module.apply, train=train))(variables, *args)


def check(name, ref, got, tol=TOL):
  """ref: torch output (NCHW tensor, or (B, K)); got: flax output (NHWC / (B, K))."""
  ref = ref.detach().numpy()
  got = np.asarray(got)
  if ref.ndim == 4:
    ref = nchw_to_nhwc(ref)
  assert ref.shape == got.shape, (name, ref.shape, got.shape)
  # The reference must carry signal, or agreement would mean nothing.
  assert np.std(ref) > 1e-3, (name, np.std(ref))
  err = float(np.max(np.abs(ref - got)))
  MAX_ERRORS[name] = max(err, MAX_ERRORS.get(name, 0.0))
  assert err < tol, f"{name}: max abs error {err:.3g} >= {tol}"


# ---------------------------------------------------------------------------------------------
# ConvNeXt.

DIMS, DEPTHS = (8, 16, 24, 32), (1, 1, 2, 1)


def test_convnext_block_parity():
  rng = np.random.default_rng(0)
  x = normal(rng, 2, 9, 11, 8)
  torch.manual_seed(0)
  tblock = randomize_(TBlock(8))
  with torch.no_grad():  # wide GELU inputs, so that its tanh approximation would not pass
    tblock.pwconv1.weight.mul_(4.0)
  block = convnext.Block(8, layer_scale_init_value=1.0)
  variables = convert_to_flax(block, tblock, x)
  with torch.no_grad():
    ref = tblock(to_torch(x))
  check("convnext.Block", ref, jit_apply(block, variables, x, train=False))


@pytest.mark.parametrize("in_chans", [3, 9])
def test_convnext_backbone_parity(in_chans):
  rng = np.random.default_rng(in_chans)
  x = normal(rng, 2, 64, 96, in_chans)
  torch.manual_seed(in_chans)
  tmodel = randomize_(TConvNeXt(in_chans, DIMS, DEPTHS))
  model = convnext.ConvNeXt(dims=DIMS, depths=DEPTHS, in_chans=in_chans, layer_scale_init_value=1.0)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    refs = tmodel(to_torch(x))
  outs = jit_apply(model, variables, x, train=False)
  assert len(outs) == 4
  for i, (ref, out) in enumerate(zip(refs, outs)):
    check(f"convnext.ConvNeXt(in_chans={in_chans}) stage {i}", ref, out)


# ---------------------------------------------------------------------------------------------
# UPerNet pieces: the functions are called from a wrapper module, as the head calls them.


class PSPWrap(fnn.Module):
  pool_scales: tuple
  channels: int

  @fnn.compact
  def __call__(self, x, train):
    return upernet.psp_forward(x, self.pool_scales, self.channels, train)


class SEFusionWrap(fnn.Module):
  reduction: int = 8

  @fnn.compact
  def __call__(self, laterals, train):
    return upernet.se_gated_fusion(laterals, self.reduction)


def test_ppm_psp_forward_parity():
  # 5x7 input: overlapping adaptive-pool bins, and scale 6 > 5 (output larger than the input).
  rng = np.random.default_rng(1)
  x = normal(rng, 2, 5, 7, 12)
  torch.manual_seed(1)
  tx = to_torch(x)
  tmodel = randomize_(TPSP((1, 2, 3, 6), 12, 8), tx)
  model = PSPWrap((1, 2, 3, 6), 8)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    ref = tmodel(tx)
  check("upernet.psp_forward", ref, jit_apply(model, variables, x, train=False))


def test_se_gated_fusion_parity():
  rng = np.random.default_rng(2)
  c = 16
  laterals = [normal(rng, 2, h, w, c) for h, w in ((13, 17), (7, 9), (4, 5), (2, 3))]
  torch.manual_seed(2)
  tmodel = randomize_(TSEFusion(c, 8))
  model = SEFusionWrap(8)
  variables = convert_to_flax(model, tmodel, laterals)
  with torch.no_grad():
    refs = tmodel([to_torch(t) for t in laterals])
  outs = jit_apply(model, variables, laterals, train=False)
  for i in range(4):
    check(f"upernet.se_gated_fusion level {i}", refs[i], outs[i])


def test_uperhead_parity():
  rng = np.random.default_rng(7)
  dims = (8, 16, 24, 32)
  feats = [normal(rng, 2, 24 // 2**i, 32 // 2**i, d) for i, d in enumerate(dims)]
  torch.manual_seed(7)
  tfeats = [to_torch(f) for f in feats]
  tmodel = randomize_(TUPerHead(dims, 16, (1, 2, 3, 6), 5), tfeats)
  model = upernet.UPerHead(channels=16, num_classes=5)
  variables = convert_to_flax(model, tmodel, feats)
  with torch.no_grad():
    ref = tmodel(tfeats)
  check("upernet.UPerHead", ref, jit_apply(model, variables, feats, train=False))


# ---------------------------------------------------------------------------------------------
# DeepLabV3+ head.


def test_depthwise_separable_aspp_head_parity():
  rng = np.random.default_rng(3)
  c1 = normal(rng, 2, 14, 18, 8)
  x = normal(rng, 2, 7, 9, 24)
  torch.manual_seed(3)
  tc1, tx = to_torch(c1), to_torch(x)
  tmodel = randomize_(TSepASPPHead(24, 16, (1, 2, 3), 8, 4), tc1, tx)
  model = deeplab.DepthwiseSeparableASPPHead(
    channels=16, dilations=(1, 2, 3), c1_channels=4, dropout=0.1, num_classes=2
  )
  variables = convert_to_flax(model, tmodel, c1, x)
  with torch.no_grad():
    ref_logits, ref_y = tmodel(tc1, tx)
  logits, y = jit_apply(model, variables, c1, x, train=False)
  check("deeplab.DepthwiseSeparableASPPHead logits", ref_logits, logits)
  check("deeplab.DepthwiseSeparableASPPHead bottleneck", ref_y, y)


# ---------------------------------------------------------------------------------------------
# APSC-Net modules.


def test_head_attn_parity():
  rng = np.random.default_rng(4)
  attn = 1.0 / (1.0 + np.exp(-normal(rng, 2, 12, 16, 1, scale=2.0)))  # a probability map
  torch.manual_seed(4)
  tattn = to_torch(attn)
  tmodel = randomize_(THeadAttn(5, 16, (4, 8)), tattn)
  model = apsc_net.HeadAttn(kernel_size=5, gen_size=16, gen_dims=(4, 8))
  variables = convert_to_flax(model, tmodel, attn)
  with torch.no_grad():
    ref = tmodel(tattn)
  check("apsc_net.HeadAttn", ref, jit_apply(model, variables, attn, train=False))


def test_scse_module_parity():
  rng = np.random.default_rng(5)
  x = normal(rng, 2, 6, 7, 20)
  torch.manual_seed(5)
  tx = to_torch(x)
  tmodel = randomize_(TSCSEModule(20, 4, 16), tx)
  model = apsc_net.SCSEModule(features=16, reduction=4)
  variables = convert_to_flax(model, tmodel, x)
  with torch.no_grad():
    ref = tmodel(tx)
  check("apsc_net.SCSEModule", ref, jit_apply(model, variables, x, train=False))


def test_apsc_head_parity(tmp_path):
  """The whole tiny head: logits, every aux logit map and the image logits.

  Also loads the same weights the way official checkpoints come: an mmseg-style .pth with the
  keys under 'decode_head.' inside {'state_dict': ...}, into the bare head.
  """
  in_channels = DIMS
  cfg = apsc_net.APSCHeadConfig(
    channels=16,
    pool_scales=(1, 2, 3, 6),
    fusion="se",
    se_reduction=8,
    feat0_channels=8,
    c1_channels=4,
    aspp_dilations=(1, 2, 3),
    rectify_passes=3,
    kernel_size=5,
    kernel_gen_size=16,
    kernel_gen_dims=(4, 8),
    cse_reduction=8,
    dropout=0.1,
    image_head=True,
    image_head_dims=(8, 8, 8),
    image_head_dropout=0.2,
    num_classes=2,
  )
  rng = np.random.default_rng(6)
  # Backbone features of a 96x128 image (strides 4, 8, 16, 32): non-square, and the PPM's
  # scale 6 exceeds the 3x4 top level.
  feats = [normal(rng, 2, 96 // s, 128 // s, c) for s, c in zip((4, 8, 16, 32), in_channels)]
  tfeats = [to_torch(f) for f in feats]
  torch.manual_seed(6)
  tmodel = randomize_(
    TAPSCHead(in_channels, 16, (1, 2, 3, 6), 8, 4, (1, 2, 3), 5, 16, (4, 8), (8, 8, 8), passes=3),
    tfeats,
  )
  model = apsc_net.APSCHead(cfg)
  variables = convert_to_flax(model, tmodel, feats)
  with torch.no_grad():
    ref_logits, ref_aux, ref_image = tmodel(tfeats)
  out = jit_apply(model, variables, feats, train=False)
  check("apsc_net.APSCHead logits", ref_logits, out["logits"])
  assert len(out["aux"]) == len(ref_aux) == 3
  for i, (ref, got) in enumerate(zip(ref_aux, out["aux"])):
    check(f"apsc_net.APSCHead aux {i}", ref, got)
  check("apsc_net.APSCHead image_logits", ref_image, out["image_logits"])

  path = str(tmp_path / "apsc_head.pth")
  torch.save(
    {
      "meta": {"iter": 1},
      "state_dict": {"decode_head." + k: v for k, v in tmodel.state_dict().items()},
    },
    path,
  )
  loaded = convert.read_state_dict(path)
  from_file, report = convert.state_dict_to_variables(
    loaded, flax_target(model, feats), strict=True
  )
  assert report.prefix == "strip 'decode_head.'"
  flat = jax.tree_util.tree_leaves_with_path(variables)
  flat_file = jax.tree_util.tree_leaves_with_path(from_file)
  assert [p for p, _ in flat] == [p for p, _ in flat_file]
  for (_, a), (_, b) in zip(flat, flat_file):
    np.testing.assert_array_equal(a, b)
