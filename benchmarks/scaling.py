"""Training throughput against the number of devices: one train_step.py run per device count.

    python benchmarks/scaling.py --config experiments/quickstart.py [--devices 1,2,4,8] \
        [--per-device-batch 2 | --global-batch 16] [--steps 10] \
        [--out benchmarks/results/scaling.json] [--config.a.b=v ...]

Weak scaling by default (the batch grows with the devices, as data parallelism is used);
`--global-batch` holds the batch fixed instead (strong scaling). Each count runs in its own
process. By default the devices are simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count), which share the machine's cores, so the
table shows the sharding overhead rather than a speed-up; on an accelerator host pass
--no-simulate and counts up to the real number of devices (the first N are used).
Prints a table (devices, mesh, batch, steps/s, images/s, efficiency against one device) and
writes it as JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(devices: int, args, extra: list[str]) -> dict:
  batch = args.global_batch or args.per_device_batch * devices
  env = dict(os.environ)
  if args.simulate:
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    done = subprocess.run(
      [
        sys.executable,
        os.path.join(HERE, "train_step.py"),
        "--config",
        args.config,
        "--batch-sizes",
        str(batch),
        "--steps",
        str(args.steps),
        "--num-devices",
        str(devices),
        "--out",
        out,
        *extra,
      ],
      env=env,
      capture_output=True,
      text=True,
    )
    if done.returncode != 0:
      raise SystemExit(f"{devices} device(s) failed:\n{done.stderr[-3000:]}")
    with open(out) as f:
      result = json.load(f)
  return {"devices": result["devices"], "device_kind": result["device_kind"], **result["rows"][0]}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--per-device-batch", type=int, default=2)
  parser.add_argument("--global-batch", type=int, default=0)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument(
    "--simulate",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="simulated CPU devices (default); --no-simulate uses the first N real devices",
  )
  parser.add_argument("--out", default="")
  args, extra = parser.parse_known_args(argv)
  rows = []
  for devices in [int(d) for d in args.devices.split(",") if d]:
    rows.append(run_one(devices, args, extra))
    print(
      f"  {devices} device(s): {rows[-1]['steps_per_s']:.2f} steps/s", file=sys.stderr, flush=True
    )
  base = rows[0]["images_per_s"] / rows[0]["devices"]
  mode = "strong (fixed global batch)" if args.global_batch else "weak (fixed per-device batch)"
  print(f"{args.config}, {mode}, {rows[0]['device_kind']}, {os.cpu_count()} CPUs")
  print(
    f"{'devices':>8}{'mesh':>24}{'batch':>7}{'steps/s':>9}{'img/s':>9}{'img/s/dev':>11}"
    f"{'efficiency':>12}"
  )
  for r in rows:
    per_device = r["images_per_s"] / r["devices"]
    r["efficiency"] = per_device / base
    print(
      f"{r['devices']:>8}{str(r['mesh']):>24}{r['batch_size']:>7}{r['steps_per_s']:>9.2f}"
      f"{r['images_per_s']:>9.1f}{per_device:>11.1f}{r['efficiency']:>12.0%}"
    )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(
        {"config": args.config, "overrides": extra, "mode": mode, "rows": rows}, f, indent=2
      )


if __name__ == "__main__":
  sys.exit(main())
