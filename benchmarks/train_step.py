"""Training-step throughput of a config's model on the local devices (no input pipeline).

    python benchmarks/train_step.py --config experiments/quickstart.py [--batch-sizes 8,16] \
        [--steps 10] [--out benchmarks/results/train_step.json] [--config.a.b=v ...]

Prints a table (mesh, batch size, compile seconds, steps/s, images/s, XLA's GFLOP per device
per step, achieved TFLOP/s per device and MFU where the device's peak is known, see
miml_jax/mfu.py) and writes it as JSON.
The mesh comes from the config (`--config.mesh.fsdp=4`); simulate N CPU devices with
XLA_FLAGS=--xla_force_host_platform_device_count=N. Random batches of the task's fields (images,
labels) stand in for data, so the numbers are the model + optimiser alone.
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
from miml_jax import mfu, models, optim, sharding, tasks, train


def measure(config, batch_size: int, steps: int, num_devices: int = 0) -> dict:
  mesh = sharding.make_mesh(config, jax.devices()[:num_devices] if num_devices else None)
  model = models.build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, models.abstract_variables(model, config)["params"])
  model_vars, train_vars = train.init_state(model, optimizer, config, jax.random.PRNGKey(0))
  # Placed like the trainer's state (committed to the mesh: arrays without it trace to a
  # different type, and the second step would compile again).
  state_shardings = sharding.tree_shardings((model_vars, train_vars), mesh, config)
  model_vars, train_vars = jax.device_put((model_vars, train_vars), state_shardings)
  step_fn = train.make_train_step(model, optimizer, config, mesh, state_shardings)
  size = config.input.augment.crop_size
  # A random batch of the shapes the config's task trains on (images, labels, ...).
  batch = jax.device_put(
    tasks.build(config).random_batch(np.random.default_rng(0), batch_size, size),
    sharding.batch_sharding(mesh),
  )
  t = time.perf_counter()
  step_fn = step_fn.lower(model_vars, train_vars, batch).compile()
  compile_s = time.perf_counter() - t
  flops = mfu.compiled_flops(step_fn)
  peak = mfu.peak_flops_per_device(mesh.devices.flat[0], config.train.peak_flops_per_device)
  model_vars, train_vars, metrics = step_fn(model_vars, train_vars, batch)  # warm-up
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    model_vars, train_vars, metrics = step_fn(model_vars, train_vars, batch)
  jax.block_until_ready(metrics)
  elapsed = time.perf_counter() - t
  rate = steps / elapsed
  return {
    "batch_size": batch_size,
    "image_size": size,
    "mesh": dict(mesh.shape),
    "compile_s": compile_s,
    "steps_per_s": rate,
    "images_per_s": rate * batch_size,
    "gflop_per_device_step": flops / 1e9 if flops else None,
    "tflops_per_device": flops * rate / 1e12 if flops else None,
    "mfu": flops * rate / peak if flops and peak else None,
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--batch-sizes", default="")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument(
    "--num-devices", type=int, default=0, help="use the first N devices (default: all)"
  )
  parser.add_argument("--out", default="")
  args, extra = parser.parse_known_args(argv)
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(
    config, [e[len("--config.") :] for e in extra if e.startswith("--config.")]
  )
  config = tasks.validate_config(config)
  sizes = [int(s) for s in args.batch_sizes.split(",") if s] or [config.input.batch_size]
  device = jax.devices()[0]
  rows = [measure(config, b, args.steps, args.num_devices) for b in sizes]
  devices = args.num_devices or len(jax.devices())
  print(
    f"{args.config} on {devices} x {device.device_kind} ({device.platform}), "
    f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  )
  print(
    f"{'mesh':>22}{'batch':>6}{'size':>6}{'compile s':>11}{'steps/s':>9}{'img/s':>9}"
    f"{'GFLOP/dev':>11}{'TFLOP/s/dev':>13}{'MFU':>7}"
  )
  fmt = lambda v, spec: "-" if v is None else format(v, spec)
  for r in rows:
    print(
      f"{str(r['mesh']):>22}{r['batch_size']:>6}{r['image_size']:>6}{r['compile_s']:>11.1f}"
      f"{r['steps_per_s']:>9.2f}{r['images_per_s']:>9.1f}"
      f"{fmt(r['gflop_per_device_step'], '.1f'):>11}{fmt(r['tflops_per_device'], '.4f'):>13}"
      f"{fmt(r['mfu'], '.1%'):>7}"
    )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(
        {
          "config": args.config,
          "overrides": extra,
          "devices": devices,
          "device_kind": device.device_kind,
          "jax": jax.__version__,
          "rows": rows,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  sys.exit(main())
