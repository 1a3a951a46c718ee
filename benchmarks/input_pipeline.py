"""Images/s of the training input pipeline, per data source, crop size and worker count.

    python benchmarks/input_pipeline.py [--sources synthetic,casia,coco,coco_no_jitter] \
        [--crops 512] \
        [--workers 0,1,2] [--batch-size 8] [--config experiments/apsc_net.py] \
        [--out benchmarks/results/input_pipeline.json] [--config.a.b=v ...]

Builds `pipeline.train_dataset` exactly as the trainer does (source from `sources.make_source`
for training, the config's augmentations with crop_size and data.image_size set to the crop,
`input.num_workers` replaced by each --workers value), pulls warm-up batches, then times more
and prints a table (images/s, ms/batch, the first batch's latency, Object Jitter's fallbacks
where known) and writes it as JSON with the machine (CPUs, platform, Python, jax / grain /
OpenCV versions, load average).

Sources: `synthetic` (the embedded set), `casia` (../shared/data/casia1_samples, arranged into
the MIML layout imgs/ + masks/ with symlinks in a temporary folder), `coco`
(coco:../shared/data/coco_mini, Object Jitter on), `coco_no_jitter` (the same source with the
jitter itself switched off: read, decode masks, resize, crop), or any source string
(folder:PATH, a mixture, ...). A source whose data is absent is skipped with a note.

Timing: grain reads ahead with `ReadOptions.num_threads` threads per producer (the main process,
or each worker), which start together and so finish their batches in waves, and keep producing
while the first batch (with its one-time costs) is awaited. So the warm-up lasts at least one
wave (num_threads batches per producer) and --warmup-s seconds, which drains what was produced
ahead, and the timed run at least one more wave and --min-s seconds: the steady rate, not the
burst of batches already made.
Fallbacks (crops with no object to jitter, returned authentic) are counted in the process that
jitters: known for --workers 0 only, over every item grain read, read-ahead included.
"""

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import sys
import tempfile
import threading
import time

DEFAULT_DATA = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data"
)
EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments")


def casia_layout(data_dir: str, scratch: str) -> str | None:
  """casia1_samples (tampered/ + masks/) as a MIML-layout folder of symlinks, or None if absent."""
  root = os.path.join(data_dir, "casia1_samples")
  tampered, masks = os.path.join(root, "tampered"), os.path.join(root, "masks")
  if not (os.path.isdir(tampered) and os.path.isdir(masks)):
    return None
  layout = os.path.join(scratch, "casia1_samples")
  os.makedirs(os.path.join(layout, "imgs"))
  os.makedirs(os.path.join(layout, "masks"))
  mask_names = set(os.listdir(masks))
  for name in sorted(os.listdir(tampered)):
    if name in mask_names:  # FolderSource wants a mask per image; CASIA's share the file name.
      os.symlink(os.path.join(os.path.abspath(tampered), name), os.path.join(layout, "imgs", name))
      os.symlink(os.path.join(os.path.abspath(masks), name), os.path.join(layout, "masks", name))
  return layout


def resolve_source(name: str, data_dir: str, scratch: str) -> tuple[str | None, str]:
  """(source string or None if its data is absent, why absent)."""
  if name == "synthetic":
    return "synthetic", ""
  if name == "casia":
    layout = casia_layout(data_dir, scratch)
    return (f"folder:{layout}", "") if layout else (None, f"{data_dir}/casia1_samples is absent")
  if name in ("coco", "coco_no_jitter"):
    root = os.path.join(data_dir, "coco_mini")
    return (f"coco:{root}", "") if os.path.isdir(root) else (None, f"{root} is absent")
  return name, ""


def host_crops_only(transform):
  """Turns a coco: source's ObjectJitterTransform into the same data flow (read, decode the
  instance masks, resize, pad, one random crop) without Object Jitter itself, so the difference
  between `coco` and `coco_no_jitter` rows is what the jitter costs."""
  import numpy as np

  from miml_jax.input import coco

  def random_map(element, rng):
    size = transform.crop_size
    image, instances = coco.random_resize(
      element["image"], element["instances"], rng, size, transform.resize_range
    )
    image, _ = coco.pad_to_crop(image, instances, size)
    y = int(rng.integers(0, image.shape[0] - size + 1))
    x = int(rng.integers(0, image.shape[1] - size + 1))
    return {
      "image": np.ascontiguousarray(image[y : y + size, x : x + size]),
      "mask": np.zeros((size, size), np.uint8),
    }

  transform.random_map = random_map


def jitter_transforms(source) -> list:
  """The ObjectJitterTransforms inside a source (alone, in a mixture, or wrapped for skipping)."""
  from miml_jax.input import coco

  source = getattr(source, "source", source)  # SkipUnreadable (data.on_error='skip').
  parts = [part for _, part, _ in getattr(source, "parts", [])] or [source]
  return [part.transform for part in parts if isinstance(part, coco.ObjectJitterSource)]


def wait_for_prefetch_threads():
  """Waits for grain's read-ahead threads of closed iterators, so the next run has the CPUs."""
  for thread in threading.enumerate():
    if thread.name.startswith("grain-prefetch") and thread is not threading.current_thread():
      thread.join()


def measure(
  config,
  spec: str,
  crop: int,
  workers: int,
  batch_size: int,
  warmup: int,
  batches: int,
  warmup_s: float,
  min_s: float,
  jitter: bool = True,
) -> dict:
  import grain

  from miml_jax import tasks
  from miml_jax.input import pipeline, sources, transforms

  source = sources.make_source(
    spec,
    "train",
    image_size=crop,
    seed=config.data.seed,
    on_error=config.data.on_error,
    for_training=True,
  )
  augment = dataclasses.replace(
    transforms.AugmentConfig.from_config(config.input.augment), crop_size=crop
  )
  jitters = jitter_transforms(source)
  for transform in jitters:
    transform.fallback_count = 0
    if not jitter:
      host_crops_only(transform)
  jitters = jitters if jitter else []
  producers = max(1, workers)
  wave = grain.ReadOptions().num_threads * producers
  warmup, batches = warmup or wave, batches or wave
  start = time.perf_counter()
  transform = tasks.build(config).train_transform(augment)
  iterator = iter(
    pipeline.train_dataset(
      source, batch_size=batch_size, transform=transform, seed=config.seed, num_workers=workers
    )
  )
  next(iterator)
  first_s = time.perf_counter() - start
  # Batches that finished while the first was awaited come at once: drain them, by time.
  warmed, start = 1, time.perf_counter()
  while warmed < warmup or time.perf_counter() - start < warmup_s:
    next(iterator)
    warmed += 1
  timed, start = 0, time.perf_counter()
  while timed < batches or time.perf_counter() - start < min_s:
    batch = next(iterator)
    timed += 1
  elapsed = time.perf_counter() - start
  assert batch["image"].shape == (batch_size, crop, crop, 3), batch["image"].shape
  iterator.close()
  wait_for_prefetch_threads()
  fallbacks = sum(t.fallback_count for t in jitters) if jitters and workers == 0 else None
  return {
    "source": spec,
    "examples": len(source),
    "crop": crop,
    "workers": workers,
    "batch_size": batch_size,
    "warmup_batches": warmed,
    "timed_batches": timed,
    "timed_s": elapsed,
    "first_batch_s": first_s,
    "ms_per_batch": 1e3 * elapsed / timed,
    "images_per_s": timed * batch_size / elapsed,
    "object_jitter": bool(jitters),
    "object_jitter_fallbacks": fallbacks,
    # Other programs' load during the run (the machine may be shared): noisy rows show it.
    "load_average_1min_after": os.getloadavg()[0],
  }


def machine() -> dict:
  versions = {}
  for package in ("jax", "grain", "numpy", "opencv-python-headless"):
    try:
      versions[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      versions[package] = None
  return {
    "cpu_count": os.cpu_count(),
    "cpus_usable": len(os.sched_getaffinity(0)),
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "python": platform.python_version(),
    "versions": versions,
    "load_average_1_5_15": list(os.getloadavg()),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--sources",
    default="synthetic,casia,coco,coco_no_jitter",
    help="comma-separated: synthetic, casia, coco, coco_no_jitter, or source strings",
  )
  parser.add_argument("--crops", default="512", help="comma-separated crop sizes")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument(
    "--warmup",
    type=int,
    default=0,
    help="batches before timing (default one wave: grain's read threads x producers)",
  )
  parser.add_argument(
    "--warmup-s",
    type=float,
    default=2.0,
    help="and at least this many seconds after the first batch",
  )
  parser.add_argument(
    "--batches", type=int, default=0, help="timed batches, at least (default one wave)"
  )
  parser.add_argument("--min-s", type=float, default=3.0, help="and at least this many seconds")
  parser.add_argument(
    "--config",
    default=os.path.join(EXPERIMENTS, "apsc_net.py"),
    help="whose augmentations, seeds and on_error to use (default apsc_net: the paper's recipe)",
  )
  parser.add_argument("--data", default=DEFAULT_DATA, help="the shared data folder")
  parser.add_argument("--out", default="")
  args, extra = parser.parse_known_args(argv)
  # grain 0.2.18's worker processes read absl flags (docs/stack.md, the grain absl bug).
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  from miml_jax import config as config_lib

  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(
    config, [e[len("--config.") :] for e in extra if e.startswith("--config.")]
  )
  from miml_jax import tasks

  config = tasks.validate_config(config)
  crops = [int(c) for c in args.crops.split(",") if c]
  worker_counts = [int(w) for w in args.workers.split(",") if w]
  info = machine()
  rows, skipped = [], []
  with tempfile.TemporaryDirectory(prefix="miml_input_bench_") as scratch:
    for name in [s.strip() for s in args.sources.split(",") if s.strip()]:
      spec, why = resolve_source(name, args.data, scratch)
      if spec is None:
        print(f"skipping {name}: {why}", file=sys.stderr)
        skipped.append({"source": name, "why": why})
        continue
      for crop in crops:
        for workers in worker_counts:
          r = {
            "name": name,
            **measure(
              config,
              spec,
              crop,
              workers,
              args.batch_size,
              args.warmup,
              args.batches,
              args.warmup_s,
              args.min_s,
              jitter=name != "coco_no_jitter",
            ),
          }
          rows.append(r)
          print(
            f"  {name} crop {crop} workers {workers}: {r['images_per_s']:.1f} images/s",
            file=sys.stderr,
          )

  print(
    f"{args.config} augmentations, batch {args.batch_size}; {info['processor']}, "
    f"{info['cpus_usable']} of {info['cpu_count']} CPUs, load {info['load_average_1_5_15']}"
  )
  print(
    f"{'source':>15}{'n':>6}{'crop':>6}{'workers':>9}{'batches':>9}{'first s':>9}"
    f"{'ms/batch':>10}{'images/s':>10}{'fallbacks':>11}{'load':>6}"
  )
  for r in rows:
    fallbacks = "-" if r["object_jitter_fallbacks"] is None else str(r["object_jitter_fallbacks"])
    print(
      f"{r['name'][-15:]:>15}{r['examples']:>6}{r['crop']:>6}{r['workers']:>9}"
      f"{r['timed_batches']:>9}{r['first_batch_s']:>9.1f}{r['ms_per_batch']:>10.0f}"
      f"{r['images_per_s']:>10.1f}{fallbacks:>11}{r['load_average_1min_after']:>6.1f}"
    )
  for s in skipped:
    print(f"skipped {s['source']}: {s['why']}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(
        {
          "config": args.config,
          "overrides": extra,
          "machine": info,
          "rows": rows,
          "skipped": skipped,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  sys.exit(main())
