"""Training-step throughput of a config's model on the local devices (no input pipeline).

    python benchmarks/train_step.py --config experiments/quickstart.py [--batch-sizes 8,16] \
        [--steps 10] [--out benchmarks/results/train_step.json] [--config.a.b=v ...]

Prints a table (mesh, batch size, compile seconds, steps/s, images/s) and writes it as JSON.
The mesh comes from the config (`--config.mesh.fsdp=4`); simulate N CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N. Random uint8 images and labels stand in for
data, so the numbers are the model + optimiser alone.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from miml_jax import config as config_lib
from miml_jax import models, optim, sharding, train


def measure(config, batch_size: int, steps: int) -> dict:
  mesh = sharding.make_mesh(config)
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, models.abstract_variables(model, config)["params"])
  model_vars, train_vars = train.init_state(model, optimizer, config, jax.random.PRNGKey(0))
  # Placed like the trainer's state (committed to the mesh: arrays without it trace to a
  # different type, and the second step would compile again).
  state_shardings = sharding.tree_shardings((model_vars, train_vars), mesh, config)
  model_vars, train_vars = jax.device_put((model_vars, train_vars), state_shardings)
  step_fn = train.make_train_step(model, optimizer, config, mesh, state_shardings)
  size = config.input.augment.crop_size
  rng = np.random.default_rng(0)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {"image": jax.device_put(rng.integers(0, 256, (batch_size, size, size, 3), np.uint8),
                                   batch_sharding),
           "label": jax.device_put(rng.integers(0, 2, (batch_size, size, size), np.uint8),
                                   batch_sharding)}
  t = time.perf_counter()
  model_vars, train_vars, metrics = step_fn(model_vars, train_vars, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(steps):
    model_vars, train_vars, metrics = step_fn(model_vars, train_vars, batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - t
  return {"batch_size": batch_size, "image_size": size, "mesh": dict(mesh.shape),
          "compile_s": compile_s, "steps_per_s": steps / elapsed, "images_per_s": steps * batch_size / elapsed}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch-sizes", default="")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default="")
  args, extra = parser.parse_known_args(argv)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, [e[len("--config."):] for e in extra
                                      if e.startswith("--config.")])
  sizes = [int(s) for s in args.batch_sizes.split(",") if s] or [config.input.batch_size]
  device = jax.devices()[0]
  rows = [measure(config, b, args.steps) for b in sizes]
  print(f"{args.config} on {len(jax.devices())} x {device.device_kind} ({device.platform}), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  print(f"{'mesh':>22}{'batch':>6}{'size':>6}{'compile s':>11}{'steps/s':>9}{'img/s':>9}")
  for r in rows:
    print(f"{str(r['mesh']):>22}{r['batch_size']:>6}{r['image_size']:>6}{r['compile_s']:>11.1f}"
          f"{r['steps_per_s']:>9.2f}{r['images_per_s']:>9.1f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"config": args.config, "overrides": extra, "devices": len(jax.devices()),
                 "device_kind": device.device_kind, "jax": jax.__version__, "rows": rows}, f,
                indent=2)


if __name__ == "__main__":
  sys.exit(main())
