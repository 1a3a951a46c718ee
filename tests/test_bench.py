"""The fast depthwise conv equals the library conv; `miml-jax bench` runs and writes its JSON.

`layers.depthwise_conv2d` has two formulations (shifted multiply-adds with a custom VJP, the
CPU default; `lax.conv_general_dilated`, the GPU / TPU default). Both must give the same values
and gradients (w.r.t. input and kernel) on odd sizes, with dilation and the paddings the models
use, to 1e-5 relative to the largest value. No timing is asserted anywhere: only that the
benchmark runs at toy sizes and its JSON holds what it promises.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from miml_jax import bench, cli
from miml_jax.errors import UserInputError
from miml_jax.models import layers

# (batch, height, width, channels, kernel, dilation, padding): ConvNeXt's 7x7 pad 3, VAN's 5x5
# pad 2 and 7x7 dilation 3 pad 9, the MLP's 3x3 pad 1, an ASPP-like dilation larger than the
# map, no padding, and asymmetric padding.
CASES = [
  (2, 9, 11, 5, 7, 1, ((3, 3), (3, 3))),
  (2, 8, 7, 4, 5, 1, ((2, 2), (2, 2))),
  (1, 13, 10, 6, 7, 3, ((9, 9), (9, 9))),
  (2, 7, 9, 3, 3, 1, ((1, 1), (1, 1))),
  (1, 5, 6, 3, 3, 6, ((6, 6), (6, 6))),
  (1, 6, 5, 4, 3, 1, ((0, 0), (0, 0))),
  (1, 5, 6, 3, 3, 1, ((2, 0), (0, 1))),
]


def _close(name, got, ref, tol=1e-5):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  scale = float(np.max(np.abs(ref)))
  assert scale > 0, name
  err = float(np.max(np.abs(got - ref))) / scale
  assert err < tol, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1]}x{c[2]}k{c[4]}d{c[5]}")
def test_shift_depthwise_equals_lax_conv(case):
  b, h, w, c, k, d, padding = case
  rng = np.random.default_rng(k * 10 + d)
  x = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)

  def conv(impl):
    return lambda x, kernel: layers.depthwise_conv2d(x, kernel, padding, d, impl)

  with jax.default_matmul_precision("highest"):
    ref = conv("lax")(x, kernel)
    got = jax.jit(conv("shift"))(x, kernel)
    _close("value", got, ref)
    cot = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)

    def grads(impl):
      return jax.grad(lambda x, kernel: jnp.sum(conv(impl)(x, kernel) * cot), (0, 1))

    ref_dx, ref_dk = grads("lax")(x, kernel)
    dx, dk = jax.jit(grads("shift"))(x, kernel)
  _close("d/dx", dx, ref_dx)
  _close("d/dkernel", dk, ref_dk)


@pytest.mark.parametrize(
  "kernel, dilation, padding",
  [
    (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((2, 2), (2, 2))),
    (5, 1, ((0, 1), (2, 0))),
    (3, 1, ((3, 0), (0, 3))),  # more padding than the kernel reaches: the gradient crops
  ],
)
def test_tap_conv_equals_lax_conv(kernel, dilation, padding):
  """`conv2d_tap_grads` (the CPU form of stride-1 dense convs, gradients written out): values
  and both gradients equal XLA's own conv and its autodiff."""
  rng = np.random.default_rng(kernel + dilation)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 4)), jnp.float32)

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(
      x,
      w,
      (1, 1),
      padding,
      rhs_dilation=(dilation, dilation),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )

  taps = lambda x, w: layers.conv2d_tap_grads(x, w, padding, dilation)
  with jax.default_matmul_precision("highest"):
    ref = lax_conv(x, w)
    _close("value", jax.jit(taps)(x, w), ref)
    cot = jnp.asarray(rng.normal(size=ref.shape), jnp.float32)
    grads = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w) * cot), (0, 1))
    ref_dx, ref_dw = grads(lax_conv)(x, w)
    dx, dw = jax.jit(grads(taps))(x, w)
  _close("d/dx", dx, ref_dx)
  _close("d/dkernel", dw, ref_dw)


@pytest.mark.parametrize(
  "kernel, dilation, padding",
  [
    (3, 1, ((1, 1), (1, 1))),
    (3, 2, ((2, 2), (2, 2))),
    (5, 1, ((0, 1), (2, 0))),
    (1, 1, ((0, 0),) * 2),
  ],
)
def test_tap_conv_in_bfloat16_is_per_tap_matmuls_with_float32_sums(kernel, dilation, padding):
  """In bfloat16 the CPU form of a dense conv is one matmul per tap, accumulated in float32
  (XLA:CPU would run a bfloat16 conv as a float32 one, off the CPU's bfloat16 units): the same
  values and gradients as the float32 conv of the same bfloat16 numbers, to bfloat16 rounding."""
  rng = np.random.default_rng(kernel * 10 + dilation)
  x = jnp.asarray(rng.normal(size=(2, 9, 7, 24)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 24, 16)), jnp.bfloat16)
  cot = jnp.asarray(rng.normal(size=(2, 9, 7, 16)), jnp.bfloat16)
  taps = lambda x, w: layers.conv2d_tap_grads(x, w, padding, dilation)
  ref32 = lambda x, w: layers._lax_conv(x, w, padding, (dilation, dilation))
  out_shape = jax.eval_shape(taps, x, w).shape
  cot = cot[:, : out_shape[1], : out_shape[2]]
  grads = lambda f: jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * cot), (0, 1))
  with jax.default_matmul_precision("highest"):
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    ref, (ref_dx, ref_dw) = ref32(x32, w32), grads(ref32)(x32, w32)
  got, (dx, dw) = jax.jit(taps)(x, w), jax.jit(grads(taps))(x, w)
  assert got.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  # bfloat16 keeps 8 significant bits: one rounding of the float32 sums is ~2^-9 relative.
  for name, a, b in [("value", got, ref), ("d/dx", dx, ref_dx), ("d/dkernel", dw, ref_dw)]:
    _close(name, a, b, tol=2**-7)
  if jax.default_backend() == "cpu":
    hlo = jax.jit(taps).lower(x, w).as_text()
    assert "convolution" not in hlo and hlo.count("stablehlo.dot_general") == kernel * kernel
    assert re.search(r"stablehlo\.dot_general.*-> tensor<\d+x16xf32>", hlo)


def test_dense_accumulates_low_precision_in_float32_on_cpu(monkeypatch):
  """`layers.dense` in bfloat16 on CPU: a matmul with float32 output (XLA:CPU's fast bfloat16
  path, and the accumulation GPUs and TPUs use), cast back to bfloat16; float32 layers and
  $MIML_JAX_DEPTHWISE=lax keep flax's own dot_general."""
  monkeypatch.setenv(layers.DEPTHWISE_ENV, "")
  cpu = jax.default_backend() == "cpu"
  assert (layers.dense_dot_general(jnp.bfloat16) is not None) == cpu
  assert layers.dense_dot_general(jnp.float32) is None
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 40)), jnp.bfloat16)
  model = layers.dense(24, name="fc", in_features=40, dtype=jnp.bfloat16)
  variables = model.init(jax.random.PRNGKey(0), x)
  y = model.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  p = variables["params"]
  ref = np.asarray(x, np.float32) @ np.asarray(p["kernel"].astype(jnp.bfloat16), np.float32)
  _close("value", y, ref + np.asarray(p["bias"].astype(jnp.bfloat16), np.float32), tol=2**-7)
  hlo = jax.jit(model.apply).lower(variables, x).as_text()
  assert bool(re.search(r"dot_general.*-> tensor<3x5x24xf32>", hlo)) == cpu
  # The gradients (written out, operands copied transposed) run and are the float32 ones; 40
  # inputs > 24 outputs is the shape for which a folded transpose made XLA:CPU fail at run time.
  cot = jnp.asarray(rng.normal(size=y.shape), jnp.float32)

  def loss(p, x, dtype):
    return jnp.sum(layers.dense(24, name="fc", in_features=40, dtype=dtype).apply(p, x) * cot)

  with jax.default_matmul_precision("highest"):
    ref_dp, ref_dx = jax.grad(loss, (0, 1))(variables, x.astype(jnp.float32), jnp.float32)
  dp, dx = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)(variables, x, jnp.bfloat16)
  _close("d/dx", dx, ref_dx, tol=2**-7)
  _close("d/dkernel", dp["params"]["kernel"], ref_dp["params"]["kernel"], tol=2**-7)
  monkeypatch.setenv(layers.DEPTHWISE_ENV, "lax")
  assert layers.dense_dot_general(jnp.bfloat16) is None


@pytest.mark.parametrize("dilation", [1, 3])
def test_kernel_gradient_over_several_row_blocks(monkeypatch, dilation):
  """The kernel gradient loops over blocks of rows, each kernel row reading its own rows (at
  dilation 3, rows 3 apart); a height that is not a whole number of blocks (zero rows pad the
  last) gives the same sums."""
  monkeypatch.setattr(layers, "_DW_BLOCK_BYTES", 3 * 7 * 4 * 4)  # 3 rows of 7 x 4 floats
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 10, 7, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)
  pad = ((dilation, dilation), (dilation, dilation))
  loss = lambda impl: lambda k: jnp.sum(jnp.sin(layers.depthwise_conv2d(x, k, pad, dilation, impl)))
  _close("d/dkernel", jax.grad(loss("shift"))(kernel), jax.grad(loss("lax"))(kernel))


@pytest.mark.parametrize("groups, features", [(6, 6), (1, 4)])
def test_conv_modules_keep_the_nn_conv_variables(groups, features):
  """`conv2d` returns a DepthwiseConv2d for depthwise convs and a TapConv2d for dense ones:
  the same tree and initial values as the nn.Conv they stand for, and the same outputs."""
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 8, 8, 6))
  module_type = layers.DepthwiseConv2d if groups > 1 else layers.TapConv2d

  class Old(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(
        features,
        (7, 7),
        padding=((3, 3), (3, 3)),
        feature_group_count=groups,
        kernel_init=layers.torch_default_kernel_init,
        bias_init=layers.torch_default_bias_init(6 // groups * 7 * 7),
        name="conv",
      )(x)

  class New(nn.Module):
    @nn.compact
    def __call__(self, x):
      conv = layers.conv2d(features, 7, in_features=6, padding=3, groups=groups, name="conv")
      assert isinstance(conv, module_type)
      return conv(x)

  old = Old().init(jax.random.PRNGKey(0), x)
  new = New().init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  for a, b in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(Old().apply(old, x), New().apply(new, x), rtol=1e-5, atol=1e-5)


def test_depthwise_impl_choice(monkeypatch):
  monkeypatch.setenv(layers.DEPTHWISE_ENV, "lax")
  assert layers.depthwise_impl() == "lax"
  assert layers.depthwise_impl("shift") == "shift"
  monkeypatch.setenv(layers.DEPTHWISE_ENV, "")
  cpu = jax.default_backend() == "cpu"
  assert layers.depthwise_impl() == ("shift" if cpu else "lax")
  # On CPU the library conv is kept for toy maps only: narrow and small.
  assert layers.depthwise_impl(shape=(16, 16, 8)) == "lax"
  assert layers.depthwise_impl(shape=(4, 4, 768)) == ("shift" if cpu else "lax")
  assert layers.depthwise_impl(shape=(128, 128, 8)) == ("shift" if cpu else "lax")
  monkeypatch.setenv(layers.DEPTHWISE_ENV, "fast")
  with pytest.raises(UserInputError, match="MIML_JAX_DEPTHWISE"):
    layers.depthwise_impl()


def test_cpu_conv_choice(monkeypatch):
  monkeypatch.delenv(layers.CPU_CONV_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  cpu = jax.default_backend() == "cpu"
  assert layers.compiler_options() == (layers._EIGEN_CONV_OPTIONS if cpu else {})
  monkeypatch.setenv(layers.CPU_CONV_ENV, "ynnpack")
  assert layers.compiler_options() == {}
  # A user's own $XLA_FLAGS choice of the fusion types is not overridden.
  monkeypatch.setenv(layers.CPU_CONV_ENV, "eigen")
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert layers.compiler_options() == {}
  monkeypatch.setenv(layers.CPU_CONV_ENV, "onednn")
  with pytest.raises(UserInputError, match="MIML_JAX_CPU_CONV='onednn'"):
    layers.compiler_options()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_eigen_conv_option_moves_only_the_convs_off_ynnpack(monkeypatch):
  monkeypatch.delenv(layers.CPU_CONV_ENV, raising=False)
  monkeypatch.setenv("XLA_FLAGS", "")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 12, 48)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 48, 40)) * 0.1, jnp.float32)
  m = jnp.asarray(rng.normal(size=(40, 64)), jnp.float32)

  def f(x, k, m):
    y = layers._lax_conv(x, k, ((1, 1), (1, 1)), (1, 1))
    return y.reshape(-1, 40) @ m, jnp.sum(y, axis=(0, 1, 2))

  def ynn_ops(options):
    """The ops inside the computations that YNNPACK fusions call, and the outputs."""
    compiled = jax.jit(f, compiler_options=options).lower(x, k, m).compile()
    text = compiled.as_text()
    bodies = {b.group(1): b.group(0) for b in re.finditer(r"^%(\S+) \(.*?^}", text, re.M | re.S)}
    called = re.findall(r"calls=%([\w.]+).*__ynn_fusion", text)
    ops = {
      op for name in called for op in ("convolution(", "dot(", "reduce(") if op in bodies[name]
    }
    return ops, compiled(x, k, m)

  default_ops, default_out = ynn_ops(None)
  assert "convolution(" in default_ops  # else this test would not see the difference
  eigen_ops, eigen_out = ynn_ops(layers.compiler_options())
  assert "convolution(" not in eigen_ops and {"dot(", "reduce("} <= eigen_ops
  for a, b in zip(default_out, eigen_out):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
def test_bench_command_writes_json(tmp_path, capsys):
  pytest.importorskip("torch")
  out = tmp_path / "bench.json"
  code = cli.main(
    ["bench", "--tiny", "--models", "tiny_upernet", "--modes", "train,infer", "--out", str(out)]
  )
  assert code == 0
  result = json.loads(out.read_text())
  assert result["machine"]["versions"]["jax"] == jax.__version__
  assert result["machine"]["depthwise_impl"] in ("shift", "lax")
  assert result["machine"]["compiler_options"] == layers.compiler_options()
  assert result["command"].startswith("miml-jax bench --tiny")
  assert [(r["model"], r["mode"]) for r in result["rows"]] == [
    ("tiny_upernet", "train"),
    ("tiny_upernet", "infer"),
  ]
  for row in result["rows"]:
    for side in ("jax", "torch_eager"):
      assert row[side]["reps"] == 1
      assert row[side]["images_per_s"] > 0
      assert row[side]["step_s_min"] <= row[side]["step_s_median"] <= row[side]["step_s_max"]
    assert row["jax"]["flops"] > 0
    assert row["jax"]["host_peak_bytes"] > 0 and row["torch_eager"]["host_peak_bytes"] > 0
    assert row["speedup_vs_torch_eager"]["median"] > 0
    assert "waves" not in row  # Both fit in memory: interleaved.
    # The measured ceiling: each side's share of it, and the speed-up the FLOPs allow at it.
    ceiling = result["dot_ceiling"]["float32"]["ceiling_flops"]
    assert row["ceiling_flops"] == ceiling
    for side in ("jax", "torch_eager"):
      at_ceiling_s = row["jax"]["flops"] / ceiling
      assert row[side]["fraction_of_ceiling"] == pytest.approx(
        at_ceiling_s / row[side]["step_s_median"]
      )
    assert row["ceiling_speedup_vs_torch_eager"] == pytest.approx(
      1 / row["torch_eager"]["fraction_of_ceiling"]
    )
  c = result["dot_ceiling"]["float32"]
  assert c["n"] == 256 and c["jax_flops"] > 0 and c["torch_flops"] > 0
  assert c["ceiling_flops"] == max(c["jax_flops"], c["torch_flops"])
  assert result["qes"]["speedup_vs_numpy"] > 0
  assert "tiny_upernet" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_times_contenders_in_turns_when_they_do_not_fit_and_names_a_dead_one(monkeypatch):
  pytest.importorskip("torch")
  case = bench.MODELS["tiny_upernet"]
  monkeypatch.setattr(bench, "_available_memory_bytes", lambda: 0)
  logged = []
  row = bench.measure(
    case,
    case.sizes[1],
    "float32",
    "infer",
    reps=2,
    torch_modes=["eager"],
    threads=1,
    log=logged.append,
  )
  assert row["waves"] == [["jax"], ["torch_eager"]]
  assert any("torch_eager does not fit in memory beside jax" in line for line in logged)
  assert len(row["jax"]["times_s"]) == len(row["torch_eager"]["times_s"]) == 2
  assert row["speedup_vs_torch_eager"]["median"] > 0
  # A contender whose process is gone (e.g. killed for memory) is named in a one-line error.
  side = bench._Contender("jax", (case, case.sizes[1], 1, "float32", "infer"))
  side._proc.kill()
  side._proc.join()
  with pytest.raises(UserInputError, match="the jax contender's process died"):
    side()
  side.close()


def test_annotate_cost_counts_flops_and_estimates_from_them(tmp_path, capsys):
  import os
  import sys

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
  import annotate_cost

  out = tmp_path / "cost.json"
  argv = ["--tiny", "--batch", "2", "--annotators", "classifier,dass,corr_dino", "--out", str(out)]
  assert annotate_cost.main(argv + ["--mfu", "0.5", "--spg-share", "0.25"]) == 0
  result = json.loads(out.read_text())
  rows = result["annotators"]
  assert all(rows[name]["flops_per_pair"] > 0 for name in ("classifier", "dass", "corr_dino"))
  (estimate,) = result["estimates"]  # SACM was not measured: no SACM estimate.
  per_pair = rows["classifier"]["flops_per_pair"]
  per_pair += 0.25 * rows["dass"]["flops_per_pair"] + 0.75 * rows["corr_dino"]["flops_per_pair"]
  assert estimate["flops_per_pair"] == pytest.approx(per_pair)
  h100 = estimate["accelerators"]["H100"]
  assert h100["pairs_per_s"] == pytest.approx(989e12 * 0.5 / per_pair)
  assert "hours per million pairs" in capsys.readouterr().out
  # --time runs the compiled step and reports what it measured.
  timed = ["--tiny", "--batch", "2", "--annotators", "classifier", "--time", "--out", str(out)]
  assert annotate_cost.main(timed) == 0
  row = json.loads(out.read_text())["annotators"]["classifier"]
  assert row["pairs_per_s"] > 0 and row["step_s"] > 0 and row["compile_s"] > 0
  with pytest.raises(SystemExit):
    annotate_cost.main(["--annotators", "resnet"])


@pytest.mark.slow
def test_dot_ceiling_without_a_working_torch_is_jax_alone():
  pytest.importorskip("torch")
  # torch.set_num_threads(0) fails in the torch process, as a missing torch would.
  c = bench.dot_ceiling("float32", 64, 1, torch=True, threads=0, log=lambda line: None)
  assert "set_num_threads" in c["torch_error"] and "torch_flops" not in c
  assert c["ceiling_flops"] == c["jax_flops"] > 0


def test_bench_rejects_bad_arguments(capsys):
  assert cli.main(["bench", "--tiny", "--models", "resnet"]) == cli.EXIT_USER_ERROR
  assert "--models: unknown model 'resnet'" in capsys.readouterr().err
  assert cli.main(["bench", "--tiny", "--ceiling-size", "-1"]) == cli.EXIT_USER_ERROR
  assert "--ceiling-size: -1 must be >= 0" in capsys.readouterr().err


@pytest.mark.parametrize(
  "in_hw, size, align_corners, scale_factor",
  [((5, 7), (12, 9), False, None), ((8, 8), (3, 5), True, None), ((9, 7), None, False, 0.5)],
)
def test_resize_gradient_is_the_gathers_transpose(in_hw, size, align_corners, scale_factor):
  """resize_bilinear's custom backward (transposed interpolation matrix) equals autodiff of
  its gathers (a scatter-add)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *in_hw, 3)), jnp.float32)
  out = layers.resize_bilinear(x, size, align_corners, scale_factor)

  def gathers(x):
    for axis, n in ((1, out.shape[1]), (2, out.shape[2])):
      i0, i1, w1 = layers._linear_taps(x.shape[axis], n, align_corners, scale_factor)
      shape = [1, 1, 1, 1]
      shape[axis] = n
      w = jnp.asarray(w1.reshape(shape))
      x = jnp.take(x, i0, axis=axis) * (1 - w) + jnp.take(x, i1, axis=axis) * w
    return x

  cot = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
  np.testing.assert_array_equal(out, gathers(x))
  ref = jax.grad(lambda x: jnp.sum(gathers(x) * cot))(x)
  got = jax.jit(
    jax.grad(lambda x: jnp.sum(layers.resize_bilinear(x, size, align_corners, scale_factor) * cot))
  )(x)
  _close("d/dx", got, ref)
