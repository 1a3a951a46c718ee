"""A second real test set: the same-size web pairs' real in-place edits, with masks from the
pair itself.

    python experiments/reports/web_pairs_set.py --out workdirs/web_spg
    python experiments/reports/transfer_table.py --data benco:workdirs/web_spg/web_spg.json \\
        --run ...

`../shared/data/web_pairs` holds 71 real web forgeries (PhotoshopBattles-style) with their
authentic source and no mask. Where the two images have the same size the edit was made in
place, and outside it the forged image repeats the authentic one's pixels (the median
difference is 0-2 grey levels in 22 of the 25 pairs). So the pair shows where the edit is:
- the mask is CAAA's trivial SPG annotator (`annotate.trivial_annotation`: some channel differs
  by more than 24 grey levels), opened with a 3 x 3 square to drop isolated pixels, closed with
  a square of 1 % of the shorter side to join the fragments of one edit, and its holes filled
  (an edit's pixels that happen to match the photo they cover);
- a pair whose mask covers more than half the image is a global edit (a colour grade or a
  vignette over everything), where "which pixels" has no answer: it is left out and listed.

The edited images are the positives and their authentic sources the negatives, so the set
scores both localisation and detection, like casia1_samples.json. The masks are derived, not
drawn by hand: a pasted pixel that matches the photo exactly under an open region is missed,
and the closing adds a thin rim around each edit. `contact_sheet.jpg` shows every pair (authentic,
edited, mask). The script writes its files into `--out` only (masks/, web_spg.json with paths
relative to it, contact_sheet.jpg, excluded.txt); nothing of the shared data is copied. No
config was chosen on this set: it was made after every `real_transfer.py` run was fixed.
"""

import argparse
import glob
import json
import os

import cv2
import numpy as np

from miml_jax import io, visualize
from miml_jax.annotate import trivial_annotation

WEB = "../shared/data/web_pairs"
# A mask larger than this fraction of its image is a global edit, not a localised one.
MAX_AREA = 0.5


def derived_mask(authentic: np.ndarray, forged: np.ndarray, threshold: int) -> np.ndarray:
  """The edit of a same-size pair as a bool (H, W) mask (module docstring)."""
  mask = trivial_annotation(authentic, forged, threshold).astype(np.uint8)
  mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
  side = max(3, round(0.01 * min(mask.shape)) | 1)
  mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((side, side), np.uint8))
  # Holes are the background components that do not touch the border.
  count, labels = cv2.connectedComponents(1 - mask, connectivity=4)
  border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
  holes = ~np.isin(labels, border) & (mask == 0)
  return (mask > 0) | holes


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--pairs", default=WEB, help=f"<id>/0.<ext> authentic, 1.<ext> edited (default {WEB})"
  )
  parser.add_argument("--out", required=True, help="folder for masks/, web_spg.json and the sheet")
  parser.add_argument("--threshold", type=int, default=24, help="grey levels (default 24)")
  args = parser.parse_args(argv)
  if not os.path.isdir(args.pairs):
    parser.error(f"--pairs {args.pairs}: no such folder")
  os.makedirs(os.path.join(args.out, "masks"), exist_ok=True)

  entries, excluded, rows = [], [], []
  for pair_dir in sorted(glob.glob(os.path.join(args.pairs, "*"))):
    pid = os.path.basename(pair_dir)
    files = {os.path.splitext(os.path.basename(p))[0]: p for p in io.list_images(pair_dir)}
    if not {"0", "1"} <= files.keys():
      excluded.append(f"{pid}: no 0.<ext> / 1.<ext> pair")
      continue
    authentic, forged = io.read_image(files["0"]), io.read_image(files["1"])
    if authentic.shape != forged.shape:
      continue  # Not an in-place edit (a paste into another photo, or a crop).
    mask = derived_mask(authentic, forged, args.threshold)
    if mask.mean() > MAX_AREA:
      excluded.append(
        f"{pid}: the difference covers {mask.mean():.0%} of the image (a global edit)"
      )
      continue
    mask_path = os.path.join(args.out, "masks", f"{pid}.png")
    io.write_image(mask_path, mask.astype(np.uint8) * 255)
    entries += [
      [os.path.relpath(files["1"], args.out), os.path.relpath(mask_path, args.out)],
      [os.path.relpath(files["0"], args.out), "Negative"],
    ]
    edited = visualize.outline(forged, mask)
    row = [authentic, edited, np.repeat(mask[..., None] * 255, 3, -1).astype(np.uint8)]
    # Scaled down at once: the sheet's memory stays small, whatever the photos' size.
    rows.append(visualize.contact_sheet([np.concatenate(row, 1)]))
  if not entries:
    raise SystemExit(f"--pairs {args.pairs}: no pair of the same size with a localised edit")

  with open(os.path.join(args.out, "web_spg.json"), "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(entry) for entry in entries) + "\n]\n")
  with open(os.path.join(args.out, "excluded.txt"), "w") as f:
    f.write("".join(line + "\n" for line in excluded))
  visualize.save(os.path.join(args.out, "contact_sheet.jpg"), visualize.contact_sheet(rows))
  print(
    f"{len(entries) // 2} edited images with masks and their sources in {args.out}/web_spg.json"
  )
  for line in excluded:
    print("left out:", line)


if __name__ == "__main__":
  main()
