"""ManTra-Net (miml_jax/models/mantranet.py) against direct NumPy statements of the official Keras
layers, the Keras HDF5 importer (keras_h5.py) on files the tests write with the released files'
layer names and shapes, the constraints applied after each update by the trainer, and the tiny
recipe through `miml-jax train / eval / predict`."""

import json
import os

import h5py
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from keras_files import write_keras_layers
from miml_jax import cli, io, models
from miml_jax.errors import UserInputError
from miml_jax.input import sources, transforms
from miml_jax.models import convert, keras_h5, mantranet
from miml_jax.models.noise import bayar_project
from test_instance_forgery import noise
from test_tasks import coco_root  # noqa: F401 (a fixture)

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "experiments")
TINY = os.path.join(EXPERIMENTS, "mantranet.py:tiny")
FULL = os.path.join(EXPERIMENTS, "mantranet.py")


# ---- NumPy statements of the Keras layers ------------------------------------------------------
def np_conv(x, kernel, pad_mode):
  """(B, H, W, I) x (kh, kw, I, O), stride 1, padded by kernel // 2 ('symmetric' or zeros)."""
  kh, kw = kernel.shape[:2]
  widths = ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0))
  xp = np.pad(x, widths, mode="symmetric") if pad_mode == "symmetric" else np.pad(x, widths)
  height, width = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (kernel.shape[3],), np.float64)
  for dy in range(kh):
    for dx in range(kw):
      out += xp[:, dy : dy + height, dx : dx + width] @ kernel[dy, dx].astype(np.float64)
  return out


def np_window_mean(x, size):
  """Brute force: the mean of each pixel's size x size window over in-image pixels only."""
  out = np.zeros_like(x, np.float64)
  half = size // 2
  for i in range(x.shape[1]):
    for j in range(x.shape[2]):
      window = x[:, max(i - half, 0) : i + half + 1, max(j - half, 0) : j + half + 1]
      out[:, i, j] = window.mean(axis=(1, 2))
  return out


def np_hard_sigmoid(x):
  return np.clip(0.2 * x + 0.5, 0, 1)


def np_conv_lstm(sequence, kernel, recurrent, bias, gate=np_hard_sigmoid):
  """Keras ConvLSTM2D, return_sequences=False: gates i, f, c, o; zero initial state."""
  f = recurrent.shape[2]
  h = np.zeros(sequence.shape[1:4] + (f,))
  c = np.zeros_like(h)
  for x in sequence:
    z = np_conv(x, kernel, "zeros") + bias + np_conv(h, recurrent, "zeros")
    i, g, cc, o = (z[..., k * f : (k + 1) * f] for k in range(4))
    c = gate(g) * c + gate(i) * np.tanh(cc)
    h = gate(o) * np.tanh(c)
  return h


def np_mantranet(w, rgb, windows, featex_type=2):
  """The official forward pass, layer by layer, from Keras-named weights: sigmoid map."""
  kernels = [w["b1c1/regular_kernel:0"]] if "b1c1/regular_kernel:0" in w else []
  srm = mantranet.srm_kernel()
  kernel = np.concatenate(kernels + [srm, w["b1c1/bayar_kernel:0"]], axis=-1)
  x = np.maximum(np_conv(rgb, kernel, "symmetric"), 0)
  for name in ["b1c2", "b2c1", "b2c2", "b3c1", "b3c2", "b3c3", "b4c1", "b4c2", "b4c3"] + [
    "b5c1",
    "b5c2",
  ]:
    x = np.maximum(np_conv(x, w[f"{name}/kernel:0"], "symmetric") + w[f"{name}/bias:0"], 0)
  x = np_conv(x, w["transform/kernel:0"], "symmetric") + w["transform/bias:0"]
  if featex_type == 0:
    x = np.tanh(x)
  x = x / np.sqrt(np.maximum((x**2).sum(-1, keepdims=True), 1e-12))
  x = x @ w["outlierTrans/kernel:0"][0, 0]
  x = (x - w["bnorm/moving_mean:0"]) / np.sqrt(w["bnorm/moving_variance:0"] + 1e-3)
  std = np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6 + w["glbStd/min_std:0"])
  mean = x.mean(axis=(1, 2), keepdims=True)
  sequence = [np.abs((np_window_mean(x, s) - x) / std) for s in windows]
  sequence = np.stack(sequence + [np.abs((mean - x) / std)])
  h = np_conv_lstm(sequence, w["cLSTM/kernel:0"], w["cLSTM/recurrent_kernel:0"], w["cLSTM/bias:0"])
  z = np_conv(h, w["pred/kernel:0"], "zeros") + w["pred/bias:0"]
  return 1 / (1 + np.exp(-z[..., 0]))


# ---- the distinctive ops -----------------------------------------------------------------------
def test_first_block_is_regular_srm_bayar_with_symmetric_padding():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 9, 11, 3)).astype(np.float32)
  module = mantranet.CombinedConv(16)
  variables = module.init(jax.random.PRNGKey(0), x)
  assert set(variables["params"]) == {"regular_kernel", "bayar_kernel"}  # SRM is no parameter.
  out = np.asarray(module.apply(variables, x))
  regular = np.asarray(variables["params"]["regular_kernel"])
  bayar = np.asarray(variables["params"]["bayar_kernel"])
  np.testing.assert_allclose(out[..., :4], np_conv(x, regular, "symmetric"), atol=1e-5)
  np.testing.assert_allclose(out[..., 13:], np_conv(x, bayar, "symmetric"), atol=1e-5)
  # SRM: each of K1, K2, K3 on each input channel alone, by explicit correlation.
  k1 = np.zeros((5, 5))
  k1[1:4, 1:4] = np.array([[-1, 2, -1], [2, -4, 2], [-1, 2, -1]]) / 4
  k2 = (
    np.array(
      [
        [-1, 2, -2, 2, -1],
        [2, -6, 8, -6, 2],
        [-2, 8, -12, 8, -2],
        [2, -6, 8, -6, 2],
        [-1, 2, -2, 2, -1],
      ]
    )
    / 12
  )
  k3 = np.zeros((5, 5))
  k3[2, 1:4] = [0.5, -1, 0.5]
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="symmetric")
  for k, srm in enumerate((k1, k2, k3)):
    for c in range(3):
      want = np.zeros((2, 9, 11))
      for i in range(9):
        for j in range(11):
          want[:, i, j] = (padded[:, i : i + 5, j : j + 5, c] * srm).sum(axis=(1, 2))
      np.testing.assert_allclose(out[..., 4 + 3 * k + c], want, atol=1e-5)
  # Types 0 / 1: 32 filters, 20 of them regular.
  wide = mantranet.CombinedConv(32).init(jax.random.PRNGKey(0), x)["params"]
  assert wide["regular_kernel"].shape == (5, 5, 3, 20)


def test_bayar_projection_matches_the_keras_constraint():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(5, 5, 3, 3)).astype(np.float32)
  got = np.asarray(bayar_project(jnp.asarray(w)))
  want = w.astype(np.float64).copy()
  for i in range(3):
    for o in range(3):
      want[2, 2, i, o] = 0
      want[:, :, i, o] /= want[:, :, i, o].sum() + 1e-7
      want[2, 2, i, o] = -1
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert np.allclose(got.sum(axis=(0, 1)), 0, atol=1e-4)  # off-centre sum 1, centre -1
  # unit_norm over the input axis, non_neg on min_std: the other two Keras constraints.
  kernel = rng.normal(size=(1, 1, 6, 4)).astype(np.float32)
  normed = np.asarray(mantranet.unit_norm(jnp.asarray(kernel)))
  np.testing.assert_allclose(np.linalg.norm(normed[0, 0], axis=0), 1, rtol=1e-5)


def test_window_means_count_only_in_image_pixels():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 13, 17, 3)).astype(np.float32) + 5  # An offset the centring removes.
  for size in (1, 3, 7, 15, 31):  # 15 and 31 reach past every border of a 13 x 17 map.
    got = np.asarray(mantranet.window_means(jnp.asarray(x), size))
    np.testing.assert_allclose(got, np_window_mean(x, size), atol=1e-5, err_msg=str(size))


def test_z_pool_divides_by_the_floored_global_std():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 10, 12, 4)).astype(np.float32)
  x[1, ..., 2] = 0.25  # A constant channel: its std is 0, so the floor 1e-6 + min_std rules.
  min_std = np.full((1, 1, 1, 4), 1e-5, np.float32)
  min_std[..., 3] = 2.0  # A floor above the channel's own std.
  got = np.asarray(mantranet.z_pool(jnp.asarray(x), (3, 7), jnp.asarray(min_std)))
  std = np.maximum(x.std(axis=(1, 2), keepdims=True), 1e-6 + min_std)
  mean = x.mean(axis=(1, 2), keepdims=True)
  want = [np.abs((np_window_mean(x, s) - x) / std) for s in (3, 7)] + [np.abs((mean - x) / std)]
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-5)
  assert np.all(got[:, 1, ..., 2] == 0)
  # The floor's gradient is finite on the constant channel (sqrt's at 0 is not).
  grad = jax.grad(lambda m: mantranet.z_pool(jnp.asarray(x), (3,), m).sum())(jnp.asarray(min_std))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_conv_lstm_keeps_keras_gate_order_and_hard_sigmoid():
  rng = np.random.default_rng(4)
  sequence = rng.normal(size=(3, 2, 6, 7, 5)).astype(np.float32)
  module = mantranet.ConvLSTM(filters=2, size=3)
  variables = module.init(jax.random.PRNGKey(0), sequence)
  p = {k: np.asarray(v) for k, v in variables["params"].items()}
  assert p["kernel"].shape == (3, 3, 5, 8) and p["recurrent_kernel"].shape == (3, 3, 2, 8)
  np.testing.assert_array_equal(p["bias"], [0, 0, 1, 1, 0, 0, 0, 0])  # unit_forget_bias
  # Large weights drive the gates into hard_sigmoid's clipped range as well as its slope.
  p = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in p.items()}
  got = np.asarray(module.apply({"params": p}, sequence))
  want = np_conv_lstm(sequence, p["kernel"], p["recurrent_kernel"], p["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # Inputs where the alternatives differ: the logistic sigmoid, or another gate order.
  logistic = np_conv_lstm(
    sequence, p["kernel"], p["recurrent_kernel"], p["bias"], lambda z: 1 / (1 + np.exp(-z))
  )
  assert np.abs(logistic - want).max() > 0.05
  swapped = np.concatenate([p["kernel"][..., 2:4], p["kernel"][..., :2], p["kernel"][..., 4:]], -1)
  assert (
    np.abs(np_conv_lstm(sequence, swapped, p["recurrent_kernel"], p["bias"]) - want).max() > 0.05
  )


def test_parameter_counts_are_the_published_ones():
  config = ml_collections.ConfigDict({"model": {"name": "mantranet"}})
  variables = models.abstract_variables(models.build_model(config.model), config)
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))
  # Keras' total counts bnorm's 128 moving statistics too.
  assert count(variables["params"]) + count(variables["batch_stats"]) == 3_805_078
  assert count(variables["params"]["Featex"]) == 3_675_181
  bad = ml_collections.ConfigDict({"name": "mantranet", "windows": (7, 14)})
  with pytest.raises(UserInputError, match="windows"):
    models.build_model(bad)


# ---- the Keras importer ------------------------------------------------------------------------
def _released_like_weights(seed=0, regular=4):
  """Keras-named weights with the released Ptrain4 file's names and shapes (a valid model:
  positive variances, constrained kernels)."""
  rng = np.random.default_rng(seed)
  shapes = {"b1c1/regular_kernel:0": (5, 5, 3, regular), "b1c1/bayar_kernel:0": (5, 5, 3, 3)}
  channels = 12 + regular
  for name, multiple in mantranet._FEATEX_BLOCKS + (("transform", 8),):
    shapes[f"{name}/kernel:0"] = (3, 3, channels, 32 * multiple)
    shapes[f"{name}/bias:0"] = (32 * multiple,)
    channels = 32 * multiple
  featex = {}
  for key, shape in shapes.items():
    fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 1
    featex[key] = (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    if key.endswith("bias:0"):
      featex[key] *= 0.1
  featex["b1c1/bayar_kernel:0"] = np.asarray(bayar_project(featex["b1c1/bayar_kernel:0"]))
  rest = {
    "outlierTrans/kernel:0": np.asarray(
      mantranet.unit_norm(rng.normal(size=(1, 1, 256, 64)).astype(np.float32))
    ),
    "bnorm/moving_mean:0": rng.normal(size=64).astype(np.float32) * 0.01,
    "bnorm/moving_variance:0": rng.uniform(0.001, 0.01, 64).astype(np.float32),
    "glbStd/min_std:0": rng.uniform(0, 1e-4, (1, 1, 1, 64)).astype(np.float32),
    "cLSTM/kernel:0": rng.normal(size=(7, 7, 64, 32)).astype(np.float32) * 0.02,
    "cLSTM/recurrent_kernel:0": rng.normal(size=(7, 7, 8, 32)).astype(np.float32) * 0.05,
    "cLSTM/bias:0": rng.normal(size=32).astype(np.float32) * 0.1,
    "pred/kernel:0": rng.normal(size=(7, 7, 8, 1)).astype(np.float32) * 0.1,
    "pred/bias:0": np.array([0.1], np.float32),
  }
  return featex, rest


def write_keras_h5(path, featex, rest, full_model=True):
  """A file in the layout Keras 2 writes: layer groups named in `layer_names`, each listing its
  weights in `weight_names` (paths inside the group); the Featex model is one layer; a full
  model (model.save) keeps them under 'model_weights'."""
  layers = {"img_in": {}, "Featex": featex}
  for key, value in rest.items():
    layers.setdefault(key.split("/")[0], {})[key] = value
  layers.update({"nestedAvgFeatex": {}, "expTime": {}, "divStd": {}})
  write_keras_layers(path, layers, full_model, keras_version="2.2.0")


def run(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def test_convert_keras_weights_and_match_the_numpy_forward_pass(tmp_path, capsys):
  featex, rest = _released_like_weights()
  weights = {**featex, **rest}
  path = tmp_path / "ManTraNet_Ptrain4.h5"
  write_keras_h5(path, featex, rest)
  assert keras_h5.read_keras_weights(str(path)).keys() == weights.keys()
  # Weights-only files (save_weights) keep the layer groups at the root: read the same.
  write_keras_h5(tmp_path / "weights_only.h5", featex, rest, full_model=False)
  again = keras_h5.read_keras_weights(str(tmp_path / "weights_only.h5"))
  assert all(np.array_equal(again[k], weights[k]) for k in weights)

  code, out, err = run(
    capsys, "convert", path, "--config", FULL, "--out", tmp_path / "m.msgpack", "--json"
  )
  assert code == 0, err
  assert json.loads(out)["converted"] == len(weights) == json.loads(out)["target_tensors"]
  variables, _ = convert.load_init_file(str(tmp_path / "m.msgpack"))
  params = variables["params"]
  np.testing.assert_array_equal(params["cLSTM"]["kernel"], weights["cLSTM/kernel:0"])
  np.testing.assert_array_equal(params["Featex"]["b3c2"]["kernel"], weights["b3c2/kernel:0"])
  np.testing.assert_array_equal(
    variables["batch_stats"]["bnorm"]["var"], rest["bnorm/moving_variance:0"]
  )

  # The whole model at eval (running statistics), against the layer-by-layer NumPy statement.
  rng = np.random.default_rng(5)
  rgb = rng.integers(0, 256, (1, 20, 23, 3)).astype(np.uint8)
  config = ml_collections.ConfigDict({"model": {"name": "mantranet"}})
  model = models.build_model(config.model)
  loaded, _ = models.load(model, config, str(tmp_path / "m.msgpack"))
  outputs = model.apply(loaded, transforms.normalize(jnp.asarray(rgb)), train=False)
  logits = np.asarray(outputs["logits"])
  assert logits.shape == (1, 20, 23, 2) and np.all(logits[..., 0] == 0)
  want = np_mantranet(weights, rgb.astype(np.float64) / 255 * 2 - 1, (7, 15, 31))
  np.testing.assert_allclose(1 / (1 + np.exp(-logits[..., 1])), want, atol=1e-4)
  assert want.std() > 1e-3  # The check compares a map, not a constant.


def test_keras_importer_is_strict(tmp_path, capsys):
  featex, rest = _released_like_weights()

  def convert_error(name, featex, rest, config=FULL):
    path = tmp_path / name
    write_keras_h5(path, featex, rest)
    code, _, err = run(capsys, "convert", path, "--config", config, "--out", tmp_path / "x.msgpack")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(path) in err
    return err

  extra = dict(rest, **{"pred/gamma:0": np.ones(1, np.float32)})
  assert "pred/gamma:0" in convert_error("extra.h5", featex, extra)
  missing = {k: v for k, v in rest.items() if k != "glbStd/min_std:0"}
  assert "glbStd/min_std" in convert_error("missing.h5", featex, missing)
  # Ptrain0/1's 32-filter first block into the Ptrain4 model: a shape mismatch, named.
  wide, _ = _released_like_weights(regular=28)
  err = convert_error("wide.h5", wide, rest)
  assert "regular_kernel" in err and "mismatched" in err
  (tmp_path / "not.h5").write_bytes(b"not an hdf5 file")
  with pytest.raises(UserInputError, match="not a readable HDF5 file"):
    keras_h5.read_keras_weights(str(tmp_path / "not.h5"))
  with h5py.File(tmp_path / "other.h5", "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(UserInputError, match="no 'layer_names' attribute"):
    keras_h5.read_keras_weights(str(tmp_path / "other.h5"))


# ---- training through the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("mantranet") / "w"
  code = cli.main(["train", "--config", TINY, "--workdir", str(workdir), "--json"])
  assert code == 0
  return workdir


def test_tiny_trains_with_the_constraints_projected_after_each_update(tiny_run):
  from miml_jax import checkpoint

  assert sorted(os.listdir(tiny_run / "checkpoints")) == ["2", "3"]
  history = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
  assert all(np.isfinite(r["loss"]) for r in history if "loss" in r)
  params = checkpoint.load_model(str(tiny_run), 3)[2]["params"]
  # The initial weights are Glorot draws; after the updates the trainer projected them.
  bayar = np.asarray(params["Featex"]["b1c1"]["bayar_kernel"])
  np.testing.assert_allclose(bayar[2, 2], -1, atol=1e-6)
  np.testing.assert_allclose(bayar.sum(axis=(0, 1)), 0, atol=1e-4)
  kernel = np.asarray(params["outlierTrans"]["kernel"])[0, 0]
  np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), 1, rtol=1e-5)
  assert np.all(np.asarray(params["glbStd"]["min_std"]) >= 0)


def test_tiny_evaluates_and_predicts_any_size(tiny_run, tmp_path, capsys):
  code, out, err = run(capsys, "eval", "--checkpoint", tiny_run, "--json")
  assert code == 0, err
  summary = json.loads(out)["summary"]
  assert summary["num_images"] == 4 and 0 <= summary["iou"] <= 1
  io.write_image(str(tmp_path / "odd.png"), noise(37, 45, 3))
  code, out, err = run(
    capsys,
    "predict",
    tmp_path / "odd.png",
    "--checkpoint",
    tiny_run,
    "--out",
    tmp_path / "p",
    "--json",
  )
  assert code == 0, err
  [record] = json.loads(out)["predictions"]
  assert io.read_image(record["files"]["heatmap"]).shape[:2] == (37, 45)


def test_coco_edit_is_the_forged_image_of_coco_spg(coco_root):  # noqa: F811
  root = coco_root
  pairs = sources.make_source(f"coco_spg:{root}", "train", image_size=48)
  single = sources.make_source(f"coco_edit:{root}", "train", image_size=48)
  assert len(single) == len(pairs) == 3
  for k in range(3):
    a, b = pairs[k], single[k]
    np.testing.assert_array_equal(a["forged"], b["image"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert b["kind"] == a["kind"] and set(b) >= {"image", "mask", "id", "is_jpeg"}
  with pytest.raises(UserInputError, match="coco_edit:/path"):
    sources.make_source("coco_edit:", "train")
