"""The ('data', 'fsdp') mesh and FSDP rules; sharded steps agree with one device.

The multi-device checks run in a subprocess with 8 simulated CPU devices (the test process has
the 2 that conftest asks for, and XLA fixes the count at import)."""

import json
import os
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from miml_jax import sharding
from miml_jax.errors import UserInputError

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _config(**mesh):
  return ml_collections.ConfigDict({"mesh": mesh})


def test_make_mesh_resolves_and_validates():
  devices = [object()] * 8  # Mesh only stores them.
  mesh = sharding.make_mesh(_config(data=-1, fsdp=4), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert dict(sharding.make_mesh(_config(), devices).shape) == {"data": 8, "fsdp": 1}
  assert dict(sharding.make_mesh(_config(data=1, fsdp=-1), devices).shape) == {"data": 1, "fsdp": 8}
  for bad, message in (
    ({"data": 3, "fsdp": 2}, "needs 6 devices"),
    ({"data": -1, "fsdp": 3}, "do not split"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 0}, "positive"),
  ):
    with pytest.raises(UserInputError, match=message):
      sharding.make_mesh(_config(**bad), devices)


def test_fsdp_rule():
  assert sharding.leaf_spec((3, 3, 64, 128), 4, min_size=1000) == P(None, None, None, "fsdp")
  # The largest divisible dimension wins; ties go to the first.
  assert sharding.leaf_spec((512, 961), 4, min_size=1000) == P("fsdp", None)
  assert sharding.leaf_spec((256, 256), 4, min_size=1000) == P("fsdp", None)
  # Small, indivisible, or no fsdp axis: replicated.
  assert sharding.leaf_spec((128,), 4, min_size=1000) == P()
  assert sharding.leaf_spec((7, 999), 4, min_size=10) == P()
  assert sharding.leaf_spec((3, 3, 64, 128), 1, min_size=1) == P()
  mesh = sharding.make_mesh(_config(data=1, fsdp=2), jax.devices()[:2])
  tree = {"w": np.zeros((64, 4096), np.float32), "b": np.zeros((4096,), np.float32)}
  specs = jax.tree_util.tree_map(
    lambda s: s.spec, sharding.tree_shardings(tree, mesh, _config(fsdp_min_size=1024))
  )
  assert specs == {"w": P(None, "fsdp"), "b": P("fsdp")}


_SHARDED_STEPS = r"""
import json, sys
import jax, numpy as np
from miml_jax import config as config_lib, models, optim, sharding, train
config = config_lib.load_config(sys.argv[1])
config_lib.apply_overrides(config, sys.argv[2:])
model = models.build_model(config.model)
batches = []
rng = np.random.default_rng(0)
for _ in range(2):
  labels = (rng.random((8, 64, 64)) < 0.2).astype(np.uint8)
  batches.append({"image": rng.integers(0, 256, (8, 64, 64, 3), np.uint8), "label": labels})
results = {}
# Both axes at once: the batch split 8 ways, the weights 4 ways (each compile costs ~1 min here).
for name, devices, mesh_cfg in (("1 device", 1, dict(data=1, fsdp=1)),
                                ("data 2 x fsdp 4", 8, dict(data=2, fsdp=4))):
  config.mesh.update(mesh_cfg)
  mesh = sharding.make_mesh(config, jax.devices()[:devices])
  optimizer = optim.make_optimizer(config.optim,
                                   models.abstract_variables(model, config)["params"])
  model_vars, train_vars = train.init_state(model, optimizer, config, jax.random.PRNGKey(0))
  shardings = sharding.tree_shardings((model_vars, train_vars), mesh, config)
  model_vars, train_vars = jax.device_put((model_vars, train_vars), shardings)
  sharded = sum(s.spec != jax.sharding.PartitionSpec()
                for s in jax.tree_util.tree_leaves(shardings[0]))
  step = train.make_train_step(model, optimizer, config, mesh, shardings)
  losses = []
  for batch in batches:
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    model_vars, train_vars, metrics = step(model_vars, train_vars, batch)
    losses.append(float(metrics["loss"]))
  leaves = [np.asarray(x).ravel() for x in jax.tree_util.tree_leaves(jax.device_get(model_vars))]
  np.save(sys.argv[0] + name.replace(" ", "_") + ".npy", np.concatenate(leaves))
  results[name] = {"losses": losses, "sharded_leaves": int(sharded)}

# The 8-device FSDP state, checkpointed, restores onto 4 devices and onto 1.
from miml_jax import checkpoint as ckpt_lib
directory = sys.argv[0] + "_checkpoints"
saver = ckpt_lib.Checkpointer(directory)
saver.save(2, model_vars, config, train_vars=train_vars)
saver.close()
saved = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get((model_vars, train_vars)))]
abstract = jax.eval_shape(lambda key: train.init_state(model, optimizer, config, key),
                          jax.random.PRNGKey(0))
for name, devices, mesh_cfg in (("restored on 4 devices", 4, dict(data=2, fsdp=2)),
                                ("restored on 1 device", 1, dict(data=1, fsdp=1))):
  config.mesh.update(mesh_cfg)
  mesh = sharding.make_mesh(config, jax.devices()[:devices])
  shardings = sharding.tree_shardings(abstract, mesh, config)
  target = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  state = reader.restore_training(2, *target)
  reader.close()
  leaves = jax.tree_util.tree_leaves(state)
  results[name] = {
      "equal": all(np.array_equal(np.asarray(x), y) for x, y in zip(leaves, saved, strict=True)),
      "on_target_shardings": all(x.sharding == s for x, s in
                                 zip(leaves, jax.tree_util.tree_leaves(shardings), strict=True)),
      "devices": len({d for x in leaves for d in x.sharding.device_set})}
print(json.dumps(results))
"""

TINY = [
  "model.backbone.dims=(8,16,16,16)",
  "model.head.channels=8",
  "model.head.feat0_channels=8",
  "model.head.kernel_gen_dims=(4,4,4,4,4)",
  "model.head.kernel_gen_size=16",
  "model.head.image_head_dims=(8,8,8)",
  "model.trace_stem=(8,)",
  "loss.ohem_min_kept=1000",
  "input.batch_size=8",
  "mesh.fsdp_min_size=256",
]


def test_data_parallel_and_fsdp_steps_match_one_device_and_restore_anywhere(tmp_path):
  """On 8 simulated devices: FSDP and data-parallel steps match one device; the 8-device
  checkpoint restores, value for value, onto 4 devices and onto 1."""
  script = tmp_path / "steps.py"
  script.write_text(_SHARDED_STEPS)
  env = {
    **os.environ,
    "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    "JAX_PLATFORMS": "cpu",
  }
  done = subprocess.run(
    [sys.executable, str(script), os.path.join(ROOT, "experiments", "quickstart.py"), *TINY],
    capture_output=True,
    text=True,
    env=env,
    timeout=900,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  assert results.pop("restored on 4 devices") == {
    "equal": True,
    "on_target_shardings": True,
    "devices": 4,
  }
  assert results.pop("restored on 1 device") == {
    "equal": True,
    "on_target_shardings": True,
    "devices": 1,
  }
  reference = results.pop("1 device")
  assert reference["sharded_leaves"] == 0
  params = {
    name: np.load(str(script) + name.replace(" ", "_") + ".npy") for name in ["1 device", *results]
  }
  for name, result in results.items():
    # Same global batch, same maths: only the order of cross-device sums differs (~1e-7
    # relative in the gradients). Adam divides by sqrt(v), which turns that into up to ~1e-4
    # of the learning rate on weights whose gradients are near zero.
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(params[name], params["1 device"], atol=1e-4, err_msg=name)
  assert results["data 2 x fsdp 4"]["sharded_leaves"] > 0
