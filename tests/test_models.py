"""Tests of miml_jax.models: the APSC-Net parameter tree and torch naming, PyTorch-exact layer
numerics against numpy references written here, and a tiny WebIML end to end.

CPU compiles are slow, so the tiny model runs un-jitted (op-by-op, whose compiled kernels are
shared across calls) and the full APSC-Net is only ever traced with jax.eval_shape.
"""

import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from miml_jax import models
from miml_jax.errors import UserInputError
from miml_jax.models import apsc_net, convnext, layers, naming, web_iml
from torch_export import to_torch_layout

# ---------------------------------------------------------------------------------------------
# The full APSC-Net: parameter count, tensor count, torch key mapping.


@pytest.fixture(scope="module")
def apsc_shapes():
  """Abstract variables of the official APSC-Net (no memory is allocated)."""
  model = models.build_model({"name": "apsc_net"})
  key = jax.random.PRNGKey(0)
  return jax.eval_shape(
    lambda: model.init({"params": key, "dropout": key}, jnp.zeros((1, 64, 64, 3)), train=False)
  )


def test_apsc_net_param_and_tensor_count(apsc_shapes):
  n_params = models.count_params(apsc_shapes)
  print(f"APSC-Net parameters: {n_params:,}")
  # About 143 M (docs/methods.md, APSC-Net): 572.5 MB in float32; the .pth is 572.9 MB (+ BN stats).
  assert n_params == 143_127_136

  keys = naming.flax_tree_to_torch_keys(apsc_shapes)
  n_bn = sum(1 for k in keys if k.endswith(".running_mean"))
  n_backbone = sum(1 for k in keys if k.startswith("backbone."))
  print(
    f"torch-keyed tensors: {len(keys)} in flax (backbone {n_backbone}, head "
    f"{len(keys) - n_backbone}); + {n_bn} num_batches_tracked = {len(keys) + n_bn}"
  )
  # Reconciliation with the official APSC-Net.pth (578 tensors), counted from the reference:
  # backbone: stem conv w/b + LN w/b (4) + 3 downsamplers x (LN w/b + conv w/b) (12) +
  #   36 blocks x (dwconv w/b, norm w/b, pwconv1 w/b, pwconv2 w/b, gamma = 9) (324) +
  #   norm0..3 w/b (8) = 348.
  # head: 34 ConvModules (psp 4, bottleneck 1, lateral 3, fpn 3, MSDEC 14 = image_pool 1 +
  #   aspp 1 + 3 x 2 + bottleneck 1 + c1_bottleneck 1 + sep_bottleneck 2 x 2, ha.kg 5, CE.c11 1,
  #   cls_head 3), each conv.weight + bn weight/bias/running_mean/running_var = 5 flax-side
  #   tensors (170), plus 13 conv/linear layers with weight + bias (SE1..3 x 2, MSDEC.conv_seg,
  #   convert, ha.kg.9, CE.cSE.1/.3, cls_head.7, conv_seg) = 26: 196.
  # 348 + 196 = 544 flax leaves. torch's BatchNorm also stores num_batches_tracked (one per BN,
  # no flax counterpart): 544 + 34 = 578, the official count. So 578 *includes* them.
  assert n_backbone == 348
  assert len(keys) - n_backbone == 196
  assert n_bn == 34
  assert len(keys) == 544
  assert len(keys) + n_bn == 578


def test_apsc_net_torch_key_spot_checks(apsc_shapes):
  keys = naming.flax_tree_to_torch_keys(apsc_shapes)
  expected = {
    "backbone.stages.2.11.dwconv.weight": (
      "params",
      "backbone/stages_2_11/dwconv/kernel",
      (512, 1, 7, 7),
    ),
    "backbone.stages.0.0.gamma": ("params", "backbone/stages_0_0/gamma", (128,)),
    "backbone.stages.3.2.pwconv1.weight": (
      "params",
      "backbone/stages_3_2/pwconv1/kernel",
      (4096, 1024),
    ),
    "backbone.downsample_layers.0.0.weight": (
      "params",
      "backbone/downsample_layers_0_0/kernel",
      (128, 3, 4, 4),
    ),
    "backbone.downsample_layers.0.1.weight": (
      "params",
      "backbone/downsample_layers_0_1/scale",
      (128,),
    ),
    "backbone.downsample_layers.2.0.bias": (
      "params",
      "backbone/downsample_layers_2_0/bias",
      (256,),
    ),
    "backbone.downsample_layers.2.1.weight": (
      "params",
      "backbone/downsample_layers_2_1/kernel",
      (512, 256, 2, 2),
    ),
    "backbone.norm3.weight": ("params", "backbone/norm3/scale", (1024,)),
    "decode_head.lateral_convs.0.conv.weight": (
      "params",
      "decode_head/lateral_convs_0/conv/kernel",
      (512, 128, 1, 1),
    ),
    "decode_head.lateral_convs.0.bn.running_var": (
      "batch_stats",
      "decode_head/lateral_convs_0/bn/var",
      (512,),
    ),
    "decode_head.psp_modules.3.1.conv.weight": (
      "params",
      "decode_head/psp_modules_3_1/conv/kernel",
      (512, 1024, 1, 1),
    ),
    "decode_head.bottleneck.conv.weight": (
      "params",
      "decode_head/bottleneck/conv/kernel",
      (512, 3072, 3, 3),
    ),
    "decode_head.ha.kg.1.conv.weight": ("params", "decode_head/ha/kg_1/conv/kernel", (32, 1, 5, 5)),
    "decode_head.ha.kg.5.conv.weight": (
      "params",
      "decode_head/ha/kg_5/conv/kernel",
      (512, 256, 3, 3),
    ),
    "decode_head.ha.kg.9.weight": ("params", "decode_head/ha/kg_9/kernel", (961, 512)),
    "decode_head.SE1.0.weight": ("params", "decode_head/SE1_0/kernel", (128, 1024, 1, 1)),
    "decode_head.SE3.2.bias": ("params", "decode_head/SE3_2/bias", (4,)),
    "decode_head.MSDEC.aspp_modules.1.depthwise_conv.conv.weight": (
      "params",
      "decode_head/MSDEC/aspp_modules_1/depthwise_conv/conv/kernel",
      (2048, 1, 3, 3),
    ),
    "decode_head.MSDEC.image_pool.1.conv.weight": (
      "params",
      "decode_head/MSDEC/image_pool_1/conv/kernel",
      (512, 2048, 1, 1),
    ),
    "decode_head.MSDEC.sep_bottleneck.0.depthwise_conv.conv.weight": (
      "params",
      "decode_head/MSDEC/sep_bottleneck_0/depthwise_conv/conv/kernel",
      (560, 1, 3, 3),
    ),
    "decode_head.MSDEC.c1_bottleneck.conv.weight": (
      "params",
      "decode_head/MSDEC/c1_bottleneck/conv/kernel",
      (48, 256, 1, 1),
    ),
    "decode_head.MSDEC.conv_seg.weight": (
      "params",
      "decode_head/MSDEC/conv_seg/kernel",
      (2, 512, 1, 1),
    ),
    "decode_head.conv_seg.bias": ("params", "decode_head/conv_seg/bias", (2,)),
    "decode_head.convert.weight": ("params", "decode_head/convert/kernel", (256, 512, 1, 1)),
    "decode_head.CE.cSE.1.weight": ("params", "decode_head/CE/cSE_1/kernel", (320, 2560, 1, 1)),
    "decode_head.CE.c11.conv.weight": (
      "params",
      "decode_head/CE/c11/conv/kernel",
      (2048, 2560, 1, 1),
    ),
    "decode_head.cls_head.0.conv.weight": (
      "params",
      "decode_head/cls_head_0/conv/kernel",
      (512, 3072, 1, 1),
    ),
    "decode_head.cls_head.4.bn.running_mean": (
      "batch_stats",
      "decode_head/cls_head_4/bn/mean",
      (256,),
    ),
    "decode_head.cls_head.7.weight": ("params", "decode_head/cls_head_7/kernel", (2, 256, 1, 1)),
  }
  for key, (col, path, shape) in expected.items():
    got_col, got_path, got_shape = keys[key]
    assert (got_col, "/".join(got_path), got_shape) == (col, path, shape), key
  assert naming.torch_key_to_flax_path("decode_head.bottleneck.bn.num_batches_tracked") is None


def test_naming_round_trip_every_key(apsc_shapes):
  keys = naming.flax_tree_to_torch_keys(apsc_shapes)
  norms = naming.norm_module_paths(apsc_shapes)
  # LayerNorms: stem 1 + downsamplers 3 + 36 blocks + norm0..3 = 44; BatchNorms: 34.
  assert len(norms) == 44 + 34
  for key, (col, path, _) in keys.items():
    # With the norm set from the tree, and with the name heuristic alone.
    assert naming.torch_key_to_flax_path(key, norms) == (col, path), key
    assert naming.torch_key_to_flax_path(key) == (col, path), key
    assert naming.flax_path_to_torch_key(col, path) == key


def test_naming_layouts():
  x = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
  path = ("conv", "kernel")
  assert to_torch_layout(path, x).shape == naming.torch_shape(path, x.shape)
  np.testing.assert_array_equal(naming.from_torch_layout(path, to_torch_layout(path, x)), x)
  d = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(to_torch_layout(("fc", "kernel"), d), d.T)
  v = np.arange(3)
  np.testing.assert_array_equal(to_torch_layout(("bn", "scale"), v), v)


# ---------------------------------------------------------------------------------------------
# Layer numerics against numpy references of the PyTorch formulas.


def _np_adaptive_pool(x, out, reduce):
  """Loop over PyTorch's adaptive bins (NHWC)."""
  b, h, w, c = x.shape
  oh, ow = out
  y = np.zeros((b, oh, ow, c), np.float64)
  for i in range(oh):
    hs, he = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
    for j in range(ow):
      ws, we = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
      y[:, i, j] = reduce(x[:, hs:he, ws:we].reshape(b, -1, c), axis=1)
  return y


@pytest.mark.parametrize(
  "in_hw,out_hw",
  [((7, 10), (3, 6)), ((10, 7), (6, 3)), ((2, 5), (6, 6)), ((6, 6), (1, 1)), ((12, 12), (3, 2))],
)
def test_adaptive_pools_match_loop(in_hw, out_hw):
  x = np.random.default_rng(0).normal(size=(2,) + in_hw + (3,)).astype(np.float32)
  np.testing.assert_allclose(
    layers.adaptive_avg_pool(jnp.asarray(x), out_hw),
    _np_adaptive_pool(x, out_hw, np.mean),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    layers.adaptive_max_pool(jnp.asarray(x), out_hw),
    _np_adaptive_pool(x, out_hw, np.max),
    rtol=0,
    atol=0,
  )


def _np_torch_bilinear(x, out_hw, align_corners, scale_factor=None):
  """PyTorch's upsample_bilinear2d, written pixel by pixel from its formulas (NHWC)."""

  def src_index(dst, in_size, out_size):
    if align_corners:
      scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
      return scale * dst
    scale = 1.0 / scale_factor if scale_factor else in_size / out_size
    return max(scale * (dst + 0.5) - 0.5, 0.0)

  b, h, w, c = x.shape
  oh, ow = out_hw
  y = np.zeros((b, oh, ow, c), np.float64)
  for i in range(oh):
    hr = src_index(i, h, oh)
    h0 = int(hr)
    h1 = h0 + (1 if h0 < h - 1 else 0)
    lh = hr - h0
    for j in range(ow):
      wr = src_index(j, w, ow)
      w0 = int(wr)
      w1 = w0 + (1 if w0 < w - 1 else 0)
      lw = wr - w0
      y[:, i, j] = (1 - lh) * ((1 - lw) * x[:, h0, w0] + lw * x[:, h0, w1]) + lh * (
        (1 - lw) * x[:, h1, w0] + lw * x[:, h1, w1]
      )
  return y


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize(
  "in_hw,out_hw",
  [
    ((5, 4), (9, 8)),
    ((4, 4), (16, 16)),
    ((9, 8), (4, 3)),
    ((16, 12), (8, 6)),
    ((1, 1), (4, 5)),
    ((7, 7), (7, 7)),
  ],
)
def test_resize_bilinear_matches_torch_formula(align_corners, in_hw, out_hw):
  x = np.random.default_rng(1).normal(size=(2,) + in_hw + (3,)).astype(np.float32)
  got = layers.resize_bilinear(jnp.asarray(x), out_hw, align_corners=align_corners)
  np.testing.assert_allclose(
    got, _np_torch_bilinear(x, out_hw, align_corners), rtol=1e-5, atol=1e-5
  )


@pytest.mark.parametrize("align_corners", [False, True])
def test_resize_bilinear_scale_factor(align_corners):
  # Odd sizes: scale_factor=0.5 maps coordinates with 2.0, not in/out; size is floor(in / 2).
  x = np.random.default_rng(2).normal(size=(1, 7, 9, 2)).astype(np.float32)
  got = layers.resize_bilinear(jnp.asarray(x), scale_factor=0.5, align_corners=align_corners)
  assert got.shape == (1, 3, 4, 2)
  np.testing.assert_allclose(
    got, _np_torch_bilinear(x, (3, 4), align_corners, 0.5), rtol=1e-5, atol=1e-5
  )
  if not align_corners:
    # ... which differs from a size= call with the same output size.
    by_size = _np_torch_bilinear(x, (3, 4), False)
    assert np.abs(np.asarray(got) - by_size).max() > 1e-3


def test_dynamic_conv_matches_per_sample_conv():
  rng = np.random.default_rng(3)
  b, h, w, k = 3, 10, 12, 7
  x = jnp.asarray(rng.normal(size=(b, h, w, 1)).astype(np.float32))
  kern = jnp.asarray(rng.normal(size=(b, k, k)).astype(np.float32))
  got = apsc_net.dynamic_conv(x, kern)
  for i in range(b):
    ref = jax.lax.conv_general_dilated(
      x[i : i + 1],
      kern[i][:, :, None, None],
      (1, 1),
      ((3, 3), (3, 3)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(got[i : i + 1], ref, rtol=1e-5, atol=1e-5)
  # Cross-correlation (torch F.conv2d), not convolution: a one-hot kernel at (0, 0) reads the
  # pixel 3 rows up and 3 columns left.
  one_hot = jnp.zeros((b, k, k)).at[:, 0, 0].set(1.0)
  shifted = apsc_net.dynamic_conv(x, one_hot)
  np.testing.assert_allclose(shifted[:, 3:, 3:], x[:, :-3, :-3])


def test_channel_interleave_matches_torch_stack_reshape():
  rng = np.random.default_rng(4)
  b, h, w, c, n = 2, 3, 4, 5, 6
  maps = [rng.normal(size=(b, h, w, c)).astype(np.float32) for _ in range(n)]
  got = np.asarray(apsc_net.interleave_channels([jnp.asarray(m) for m in maps]))
  # The reference in NCHW: torch.stack(maps, dim=2).reshape(b, c * 6, h, w).
  nchw = [m.transpose(0, 3, 1, 2) for m in maps]
  ref = np.stack(nchw, axis=2).reshape(b, c * n, h, w).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(got, ref)
  assert got[0, 0, 0, 1 * n + 2] == maps[2][0, 0, 0, 1]


def test_min_max_norm():
  x = np.random.default_rng(5).normal(size=(2, 4, 5, 1)).astype(np.float32)
  got = apsc_net.min_max_norm(jnp.asarray(x))
  lo, hi = x.min(axis=(1, 2), keepdims=True), x.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(got, (x - lo) / (hi - lo + 1e-8), rtol=1e-6)


def test_batchnorm_matches_torch_semantics():
  x = np.random.default_rng(6).normal(2.0, 3.0, size=(4, 5, 6, 3)).astype(np.float32)
  bn = layers.BatchNorm()
  v = bn.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
  y, upd = bn.apply(v, jnp.asarray(x), train=True, mutable=["batch_stats"])
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  n = 4 * 5 * 6
  # torch: running = 0.9 running + 0.1 batch, with the unbiased variance for running_var.
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
  y_eval = bn.apply({**v, **upd}, jnp.asarray(x), train=False)
  rm, rv = 0.1 * mean, 0.9 + 0.1 * var * n / (n - 1)
  np.testing.assert_allclose(y_eval, (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-4, atol=1e-4)


def test_layernorm_is_torch_exact():
  x = np.random.default_rng(7).normal(5.0, 2.0, size=(2, 3, 8)).astype(np.float32)
  ln = layers.layer_norm("norm")
  v = ln.init(jax.random.PRNGKey(0), jnp.asarray(x))
  u = x.mean(-1, keepdims=True)
  s = ((x - u) ** 2).mean(-1, keepdims=True)
  np.testing.assert_allclose(
    ln.apply(v, jnp.asarray(x)), (x - u) / np.sqrt(s + 1e-6), rtol=1e-5, atol=1e-5
  )
  assert ln.epsilon == 1e-6


def test_convnext_block_matches_numpy():
  """dwconv 7x7 pad 3 -> LN(1e-6) -> Linear 4x -> exact (erf) GELU -> Linear -> gamma + x."""
  rng = np.random.default_rng(8)
  c = 4
  x = rng.normal(size=(1, 6, 5, c)).astype(np.float32)
  block = convnext.Block(c, layer_scale_init_value=0.5)
  shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False))
  v = jax.tree_util.tree_map(
    lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32) * 0.5), shapes
  )
  p = jax.tree_util.tree_map(np.asarray, v["params"])
  k = p["dwconv"]["kernel"][:, :, 0, :]  # (7, 7, C)
  xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  y = np.zeros_like(x, dtype=np.float64)
  for i in range(6):
    for j in range(5):
      y[0, i, j] = (xp[0, i : i + 7, j : j + 7] * k).sum(axis=(0, 1))
  y += p["dwconv"]["bias"]
  u = y.mean(-1, keepdims=True)
  y = (y - u) / np.sqrt(((y - u) ** 2).mean(-1, keepdims=True) + 1e-6)
  y = y * p["norm"]["scale"] + p["norm"]["bias"]
  y = y @ p["pwconv1"]["kernel"] + p["pwconv1"]["bias"]
  y = 0.5 * y * (1 + np.vectorize(math.erf)(y / math.sqrt(2)))
  y = y @ p["pwconv2"]["kernel"] + p["pwconv2"]["bias"]
  ref = x + p["gamma"] * y
  got = block.apply(v, jnp.asarray(x), train=False)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_drop_path_is_per_sample():
  x = jnp.ones((64, 2, 2, 3))
  y = layers.DropPath(0.5).apply(
    {}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  per_sample = np.asarray(y).reshape(64, -1)
  assert set(np.unique(per_sample)) <= {0.0, 2.0}
  assert np.all(per_sample.min(axis=1) == per_sample.max(axis=1))
  assert 0 < (per_sample[:, 0] == 0).sum() < 64
  np.testing.assert_array_equal(layers.DropPath(0.5).apply({}, x, deterministic=True), x)


# ---------------------------------------------------------------------------------------------
# A tiny WebIML end to end.

# XLA's CPU compile time dominates these tests (the 3-pass head unrolls to ~10k HLO ops); the
# unoptimised backend compiles the tiny model's train step ~4x faster and runs it fast enough.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _compiler_options():
  if jax.default_backend() != "cpu":
    return None
  try:
    jax.jit(lambda a: a + 1, compiler_options=_FAST_COMPILE)(1.0)
    return _FAST_COMPILE
  except Exception:  # pylint: disable=broad-except
    return None  # An XLA without these options: compile normally.


def _jit(fn, **kw):
  return jax.jit(fn, compiler_options=_compiler_options(), **kw)


# The ASPP, PPM and kernel generator are thinner than the official ones (fewer branches) only to
# keep the compiled graph small; the code paths are the same.
TINY_HEAD = dict(
  channels=16,
  feat0_channels=8,
  c1_channels=8,
  aspp_dilations=(1, 2),
  pool_scales=(1, 3),
  kernel_size=7,
  kernel_gen_size=16,
  kernel_gen_dims=(4, 8),
  image_head_dims=(16, 8, 8),
)


def _tiny_config(**head):
  cfg = ml_collections.ConfigDict()
  cfg.name = "web_iml"
  cfg.backbone = dict(
    name="convnext",
    preset=None,
    dims=(8, 16, 32, 64),
    depths=(1, 1, 1, 1),
    in_chans=3,
    drop_path_rate=0.1,
    layer_scale_init_value=1.0,
  )
  cfg.head = {**TINY_HEAD, **head}
  cfg.dtype = "float32"
  return cfg


def _key(seed):
  # Cheaper to compile than threefry keys; the tests only need some randomness.
  return jax.random.key(seed, impl="unsafe_rbg")


def _eval_fn(model):
  return _jit(lambda v, x: model.apply(v, x, train=False))


@pytest.fixture(scope="module")
def tiny():
  model = models.build_model(_tiny_config())
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 64, 3))
  variables = _jit(model.init, static_argnames="train")(
    {"params": _key(0), "dropout": _key(1)}, x, train=False
  )
  return model, variables, x


@pytest.fixture(scope="module")
def tiny_eval(tiny):
  model, variables, x = tiny
  return _eval_fn(model)(variables, x)


def test_tiny_web_iml_train_step_and_gradients(tiny):
  model, variables, x = tiny
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"backbone", "decode_head"}

  def losses(params):
    out, upd = model.apply(
      {"params": params, "batch_stats": variables["batch_stats"]},
      x,
      train=True,
      mutable=["batch_stats"],
      rngs={"dropout": _key(2)},
    )
    seg = jnp.mean(out["logits"] ** 2) + sum(jnp.mean(a**2) for a in out["aux"])
    return jnp.stack([seg, jnp.mean(out["image_logits"] ** 2)]), (out, upd)

  # One compiled train step: the forward outputs, the BN updates, and the gradients of the
  # segmentation and image losses separately (jacrev over the 2 losses).
  grads, (out, upd) = _jit(jax.jacrev(losses, has_aux=True))(variables["params"])

  assert out["logits"].shape == (2, 16, 16, 2)
  assert out["logits"].dtype == jnp.float32
  assert len(out["aux"]) == 3 and all(a.shape == (2, 16, 16, 2) for a in out["aux"])
  assert out["image_logits"].shape == (2, 2)
  before = variables["batch_stats"]["decode_head"]["MSDEC"]["bottleneck"]["bn"]["mean"]
  after = upd["batch_stats"]["decode_head"]["MSDEC"]["bottleneck"]["bn"]["mean"]
  assert not np.allclose(before, after)

  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  seg_g = jax.tree_util.tree_map(lambda g: g[0], grads)
  img_g = jax.tree_util.tree_map(lambda g: g[1], grads)
  assert all(np.abs(g).max() > 0 for g in jax.tree_util.tree_leaves(seg_g["backbone"]))
  for name in ("ha", "CE", "MSDEC", "SE1_0", "convert", "conv_seg"):
    assert max(np.abs(g).max() for g in jax.tree_util.tree_leaves(seg_g["decode_head"][name]))
  # The image head sees a stop-gradient stack: it trains only itself.
  assert all(np.abs(g).max() == 0 for g in jax.tree_util.tree_leaves(img_g["backbone"]))
  assert np.abs(img_g["decode_head"]["cls_head_7"]["kernel"]).max() > 0


def test_image_head_detach_off_lets_the_image_loss_train_the_backbone(tiny):
  _, variables, x = tiny
  grads = {}
  for detach in (True, False):
    model = models.build_model(_tiny_config(rectify_passes=0, image_head_detach=detach))

    def image_loss(params, model=model):
      out = model.apply({**variables, "params": params}, x, train=False)
      return jnp.mean(out["image_logits"] ** 2), out["image_logits"]

    grads[detach], logits = _jit(jax.grad(image_loss, has_aux=True))(variables["params"])
    if detach:
      detached_logits = logits
  # The same variables and forward values (to float rounding: the two programs compile apart);
  # only where the image loss's gradient goes differs.
  np.testing.assert_allclose(logits, detached_logits, rtol=1e-5, atol=1e-6)
  largest = lambda tree: max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(tree))
  assert largest(grads[True]["backbone"]) == 0
  assert largest(grads[False]["backbone"]) > 0
  assert largest(grads[False]["decode_head"]["MSDEC"]) > 0


def test_tiny_web_iml_eval(tiny, tiny_eval):
  ev = tiny_eval
  assert ev["logits"].shape == (2, 16, 16, 2) and ev["logits"].dtype == jnp.float32
  assert len(ev["aux"]) == 3
  assert ev["image_logits"].shape == (2, 2)
  assert all(np.isfinite(np.asarray(ev[k])).all() for k in ("logits", "image_logits"))


@pytest.mark.parametrize(
  "head,n_aux",
  [
    (dict(rectify_passes=0), 1),
    (dict(rectify_passes=1), 1),
    (dict(fusion="sum", image_head=False), 3),
  ],
)
def test_tiny_web_iml_variants(tiny, head, n_aux):
  _, variables, x = tiny
  model = models.build_model(_tiny_config(**head))
  # Each variant's parameters are a subset of the full tiny model's (flax ignores the rest).
  shapes = jax.eval_shape(
    lambda: model.init({"params": _key(0), "dropout": _key(1)}, x, train=False)
  )
  flat_full = flax.traverse_util.flatten_dict(variables["params"])
  flat_var = flax.traverse_util.flatten_dict(shapes["params"])
  assert set(flat_var) <= set(flat_full)
  dh = shapes["params"]["decode_head"]
  if head.get("rectify_passes") == 0:
    assert "ha" not in dh and "CE" not in dh
  if head.get("rectify_passes") == 1:
    assert "ha" in dh and "CE" not in dh
  if head.get("fusion") == "sum":
    assert not any(k.startswith("SE") for k in dh)
  if head.get("image_head") is False:
    assert not any(k.startswith("cls_head") for k in dh)
  out = _eval_fn(model)(variables, x)
  assert out["logits"].shape == (2, 16, 16, 2)
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert len(out["aux"]) == n_aux
  assert (out["image_logits"] is None) == (head.get("image_head") is False)


def test_tiny_web_iml_bfloat16(tiny, tiny_eval):
  _, variables, x = tiny
  cfg = _tiny_config()
  cfg.dtype = "bfloat16"
  model = models.build_model(cfg)
  out = _eval_fn(model)(variables, x)
  assert out["logits"].dtype == jnp.float32
  assert out["image_logits"].dtype == jnp.float32
  assert np.isfinite(np.asarray(out["logits"])).all()
  ref = np.asarray(tiny_eval["logits"])
  # bf16 keeps ~3 significant digits; the tiny net's logits stay close to float32's.
  assert np.abs(np.asarray(out["logits"]) - ref).max() < 0.1 * (np.abs(ref).max() + 1)


# ---------------------------------------------------------------------------------------------
# Configuration.


def test_backbone_config_and_in_chans():
  bb = web_iml.BackboneConfig.from_dict({"preset": "tiny", "in_chans": 6})
  assert (bb.dims, bb.depths) == convnext.CONVNEXT_PRESETS["tiny"]
  model = convnext.ConvNeXt(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), in_chans=9)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 9)), train=False)
  )
  assert shapes["params"]["downsample_layers_0_0"]["kernel"].shape == (4, 4, 9, 8)
  feats = jax.eval_shape(
    lambda v, x: model.apply(v, x, train=False),
    shapes,
    jax.ShapeDtypeStruct((1, 64, 64, 9), jnp.float32),
  )
  assert [f.shape for f in feats] == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 32), (1, 2, 2, 64)]


def test_config_errors():
  with pytest.raises(UserInputError, match="unknown key"):
    models.build_model({"name": "web_iml", "head": {"chanels": 3}})
  with pytest.raises(UserInputError, match="contradicts preset"):
    web_iml.BackboneConfig.from_dict({"preset": "base", "dims": (1, 2, 3, 4)})
  with pytest.raises(UserInputError, match="model.name"):
    models.build_model({"name": "segformer"})
  with pytest.raises(UserInputError, match="fusion"):
    apsc_net.APSCHeadConfig(fusion="concat")
  with pytest.raises(UserInputError, match="fixed"):
    models.build_model({"name": "apsc_net", "backbone": {"preset": "tiny"}})
  m = models.build_model({"name": "apsc_net", "head": {"image_head": False}, "dtype": "bfloat16"})
  assert isinstance(m, models.APSCNet) and not m.head.image_head and m.dtype == jnp.bfloat16


def test_srm_residuals_match_scipy():
  from scipy import signal

  from miml_jax.models import noise

  x = np.random.default_rng(0).normal(size=(2, 12, 10, 3)).astype(np.float32)
  got = np.asarray(noise.srm_residuals(jnp.asarray(x)))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  for b in range(2):
    for k in range(3):
      for c in range(3):
        want = signal.correlate2d(padded[b, :, :, c], noise.SRM_KERNELS[k], mode="valid")
        np.testing.assert_allclose(got[b, :, :, 3 * k + c], want, atol=1e-5)
  # Every SRM kernel is a high-pass filter: a flat image has no residual.
  assert np.abs(np.asarray(noise.srm_residuals(jnp.ones((1, 8, 8, 3))))).max() < 1e-6


def test_web_iml_noise_view_widens_only_the_stem():
  cfg = _tiny_config()
  cfg.noise_view = "srm"
  model = models.build_model(cfg)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(
    lambda: model.init({"params": _key(0), "dropout": _key(1)}, x, train=False)
  )
  # 3 image channels + 9 residual channels into the 4x4 stem conv; nothing else changes.
  assert shapes["params"]["backbone"]["downsample_layers_0_0"]["kernel"].shape == (4, 4, 12, 8)
  plain = jax.eval_shape(
    lambda: models.build_model(_tiny_config()).init(
      {"params": _key(0), "dropout": _key(1)}, x, train=False
    )
  )
  assert (models.count_params(shapes) - models.count_params(plain)) == 4 * 4 * 9 * 8
  with pytest.raises(UserInputError, match="noise_view"):
    bad = _tiny_config()
    bad.noise_view = "dct"
    jax.eval_shape(lambda: models.build_model(bad).init({"params": _key(0)}, x, train=False))


def test_web_iml_bayar_view_is_constrained_and_blind_to_content():
  from miml_jax import tasks
  from miml_jax.models import noise

  cfg = _tiny_config()
  cfg.noise_view = "srm_bayar"
  model = models.build_model(cfg)
  x = jnp.zeros((1, 64, 64, 3))
  params = model.init({"params": _key(0), "dropout": _key(1)}, x, train=False)["params"]
  kernel = np.asarray(params["bayar_kernel"])
  # 3 image + 9 SRM + 3 Bayar channels into the stem; Bayar's constraint holds from init.
  assert kernel.shape == (5, 5, 3, 3)
  assert params["backbone"]["downsample_layers_0_0"]["kernel"].shape == (4, 4, 15, 8)
  np.testing.assert_allclose(kernel[2, 2], -1.0)
  np.testing.assert_allclose(kernel.sum((0, 1)), 0.0, atol=1e-4)  # taps sum to 1, centre -1
  # The task's projection (run after every optimiser update) restores it after a step moved it.
  moved = {**params, "bayar_kernel": params["bayar_kernel"] + 0.3}
  task = tasks.build(ml_collections.ConfigDict({"task": "segmentation", "model": cfg.to_dict()}))
  projected = np.asarray(task.project(moved)["bayar_kernel"])
  np.testing.assert_allclose(projected, np.asarray(noise.bayar_project(moved["bayar_kernel"])))
  np.testing.assert_allclose(projected.sum((0, 1)), 0.0, atol=1e-4)
  # Other views are left alone by the same projection.
  plain = _tiny_config().to_dict()
  assert web_iml.project(plain, moved) is moved
  # A prediction-error filter passes no flat content: on a constant image its response is 0.
  flat = jnp.full((1, 8, 8, 3), 0.7)
  response = jax.lax.conv_general_dilated(
    jnp.pad(flat, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect"),
    params["bayar_kernel"],
    (1, 1),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  assert np.abs(np.asarray(response)).max() < 1e-4


def test_srm_energy_is_a_local_noise_level():
  from miml_jax.models import noise

  rng = np.random.default_rng(0)
  x = np.full((1, 32, 32, 3), 0.5, np.float32)
  x[:, :, 16:] += rng.normal(0, 0.2, (1, 32, 16, 3)).astype(np.float32)  # noisy right half
  energy = np.asarray(noise.srm_energy(jnp.asarray(x)))
  assert energy.shape == (1, 32, 32, 9)
  # Flat left half: log(eps); noisy right half: far above it, in every channel.
  np.testing.assert_allclose(energy[0, 4:28, 2:12], np.log(1e-3), atol=1e-4)
  assert (energy[0, 4:28, 20:30] > np.log(1e-3) + 2).all()


def test_web_iml_trace_stem_feeds_the_backbone_stem():
  cfg = _tiny_config()
  cfg.noise_view = "srm"
  cfg.trace_stem = (6, 5)
  model = models.build_model(cfg)
  x = jnp.zeros((1, 64, 64, 3))
  params = jax.eval_shape(
    lambda: model.init({"params": _key(0), "dropout": _key(1)}, x, train=False)
  )["params"]
  # RGB + 9 SRM residuals -> 6 -> 5 full-resolution channels -> the 4x4 patchify stem.
  assert params["trace_stem_0"]["kernel"].shape == (3, 3, 12, 6)
  assert params["trace_stem_1"]["kernel"].shape == (3, 3, 6, 5)
  assert params["backbone"]["downsample_layers_0_0"]["kernel"].shape == (4, 4, 5, 8)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    model.init({"params": _key(0), "dropout": _key(1)}, x, train=False), x + 0.1
  )
  assert out["logits"].shape == (1, 16, 16, 2)
  with pytest.raises(UserInputError, match="unknown key.*trace_stems"):
    models.build_model({**_tiny_config().to_dict(), "trace_stems": (4,)})
