"""Object Jitter cost and output statistics on a COCO folder (default: ../shared/data/coco_mini).

    python benchmarks/object_jitter.py [--coco PATH] [--crop 512] [--images 50] \
        [--out benchmarks/results/object_jitter.json]

Prints a table and writes it as JSON:
* `object_jitter` alone per crop (images resized so each side is 1.25 x crop, centre crop; best
  of 3 timed passes), which is what the input pipeline adds per sample;
* a whole `coco:PATH` source item (read + decode masks + resize + crop + jitter) per sample,
  with the number of fallbacks (no acceptable object: authentic crop) and the mean tampered
  fraction of the masks.
"""

import argparse
import json
import os
import platform
import time
import timeit

import cv2
import numpy as np

from miml_jax.input import coco
from miml_jax.input.object_jitter import ObjectJitterConfig, object_jitter

DEFAULT_COCO = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "coco_mini")


def centre_crops(source, count: int, crop: int):
  side = int(round(1.25 * crop))
  offset = (side - crop) // 2
  crops = []
  for i in range(min(count, len(source))):
    item = source[i]
    image = cv2.resize(item["image"], (side, side))
    masks = np.stack(
      [cv2.resize(m, (side, side), interpolation=cv2.INTER_NEAREST) for m in item["instances"]]
    )
    window = slice(offset, offset + crop)
    crops.append((np.ascontiguousarray(image[window, window]), masks[:, window, window]))
  return crops


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--coco", default=DEFAULT_COCO)
  parser.add_argument("--crop", type=int, default=512)
  parser.add_argument("--images", type=int, default=50)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)

  instances = coco.CocoInstances(args.coco)
  crops = centre_crops(instances, args.images, args.crop)
  rng = np.random.default_rng(0)
  config = ObjectJitterConfig()

  def jitter_all():
    for image, masks in crops:
      object_jitter(image, masks, rng, config)

  passes = 5
  jitter_s = min(timeit.repeat(jitter_all, number=passes, repeat=3)) / (passes * len(crops))

  source = coco.ObjectJitterSource(instances, crop_size=args.crop, seed=0, split_id=0)
  count = min(args.images, len(source))
  start = time.perf_counter()
  fractions = [float(np.mean(source[i]["mask"] > 0)) for i in range(count)]
  item_s = (time.perf_counter() - start) / count

  row = {
    "crop": args.crop,
    "images": count,
    "instances_per_crop": float(np.mean([m.shape[0] for _, m in crops])),
    "object_jitter_ms": 1e3 * jitter_s,
    "source_item_ms": 1e3 * item_s,
    "fallbacks": source.transform.fallback_count,
    "mean_tampered_fraction": float(np.mean(fractions)),
  }
  print(f"{args.coco} ({instances!r}), {platform.machine()}, {os.cpu_count()} CPUs")
  print(
    f"{'crop':>6}{'images':>8}{'inst/crop':>11}{'jitter ms':>11}{'item ms':>9}"
    f"{'fallbacks':>11}{'tampered':>10}"
  )
  print(
    f"{row['crop']:>6}{row['images']:>8}{row['instances_per_crop']:>11.1f}"
    f"{row['object_jitter_ms']:>11.2f}{row['source_item_ms']:>9.1f}{row['fallbacks']:>11}"
    f"{row['mean_tampered_fraction']:>10.3f}"
  )
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"coco": os.path.abspath(args.coco), **row}, f, indent=2)


if __name__ == "__main__":
  main()
