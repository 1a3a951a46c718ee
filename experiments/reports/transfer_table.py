"""The real-transfer ablation table: each run's real-forgery scores, seeds pooled (mean, spread).

    python experiments/reports/transfer_table.py \\
        --run realistic=workdirs/rt/realistic_s0 --run realistic=workdirs/rt/realistic_s1 \\
        --run hard_paste=workdirs/rt/hard_paste_s0 ... --out experiments/reports/transfer.json

Add rows, or runs to a row, to a table made before (`--keep`: what the call does not run comes
from the JSON file, so a row's first seed stays when only its second is run; a run of the same
name and workdir is replaced):

    python experiments/reports/transfer_table.py --keep --out experiments/reports/transfer.json \\
        --run no_splice:short=workdirs/rt/no_splice_short_s0 ...

For every workdir it scores `<workdir>/best` (the checkpoint the run's own synthetic validation
chose) with `miml-jax eval` on the real set (default: the 36 CASIA v1 samples and their 36
authentic sources), once: the report stays in `<workdir>/real_eval/` (`real_eval_<name>/` for
another `--data` set, named after its list or folder) and is reused on the next call. It
prints one Markdown row per name: runs, steps, wall time, per-image IoU / F1 / pixel AUC and
image AUC (image-head and max-score) on the real set, and the synthetic held-out IoU, each as
mean +- half the range over the runs of that name (the spread of two seeds), then the real
set's all-zero and all-one rows. Wall time is from the run's config.json to its last checkpoint.
"""

import argparse
import contextlib
import glob
import json
import os
import sys

from miml_jax import cli

REAL = "benco:experiments/reports/casia1_samples.json"
COLUMNS = (
  ("iou", "IoU"),
  ("f1", "F1"),
  ("pixel_auc", "pixel AUC"),
  ("image_auc_head", "image AUC (head)"),
  ("image_auc_max", "image AUC (max)"),
  ("val_iou", "synthetic held-out IoU"),
)


def _eval_dir(workdir: str, data: str) -> str:
  """Where a run's report on `data` stays: real_eval/ for the default set, real_eval_<name>/
  (the list or folder's name) for another, so that one run is scored on several sets."""
  if data == REAL:
    return os.path.join(workdir, "real_eval")
  name = os.path.splitext(os.path.basename(data.partition(":")[2].rstrip("/")))[0]
  return os.path.join(workdir, f"real_eval_{name}")


def _real_scores(workdir: str, data: str) -> dict:
  out = _eval_dir(workdir, data)
  metrics_file = os.path.join(out, "metrics.json")
  if not os.path.exists(metrics_file):
    command = [
      "eval", "--checkpoint", os.path.join(workdir, "best"), "--data", data,
      "--threshold", "image_head", "--resize", "miml", "--out", out,
    ]  # fmt: skip
    print("$ miml-jax", " ".join(command), file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # Keep stdout for the table.
      code = cli.main(command)
    if code:
      raise SystemExit(f"{workdir}: miml-jax eval failed (exit {code})")
  with open(metrics_file) as f:
    metrics = json.load(f)
  if metrics.get("data") != data:
    raise SystemExit(f"{metrics_file}: scored on {metrics['data']}, not {data}; remove {out}")
  summary, image = metrics["summary"], metrics["image_level"]
  return {
    "iou": summary["iou"],
    "f1": summary["f1"],
    "pixel_auc": summary["pixel_auc"],
    "image_auc_head": image.get("head", {}).get("auc", float("nan")),
    "image_auc_max": image["max"]["auc"],
    "trivial": metrics["trivial"],
  }


def _run_facts(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  validations = [r for r in records if "val_iou" in r]
  if not validations:
    raise SystemExit(f"{workdir}/metrics.jsonl: no validation record (did the run finish?)")
  steps = max(r["step"] for r in records)
  checkpoints = glob.glob(os.path.join(workdir, "checkpoints", "*"))
  start = os.path.getmtime(os.path.join(workdir, "config.json"))
  end = max((os.path.getmtime(p) for p in checkpoints), default=start)
  return {
    "steps": steps,
    "wall_min": (end - start) / 60,
    "val_iou": max(r["val_iou"] for r in validations),
  }


def _spread(values):
  mean = sum(values) / len(values)
  if len(values) == 1:
    return f"{mean:.3f}", mean, 0.0
  half = (max(values) - min(values)) / 2
  return f"{mean:.3f} ± {half:.3f}", mean, half


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR, repeatable")
  parser.add_argument("--data", default=REAL, help=f"the real set (default {REAL})")
  parser.add_argument("--out", help="also write the table as JSON here")
  parser.add_argument(
    "--keep",
    action="store_true",
    help="keep the runs of the existing --out file that this call does not run (their workdirs "
    "may be gone: the file holds every number of the table); new runs join their name's row",
  )
  args = parser.parse_args(argv)
  groups: dict[str, list[dict]] = {}
  if args.keep:
    if not args.out or not os.path.exists(args.out):
      raise SystemExit(f"--keep: no table to keep at --out {args.out!r}")
    with open(args.out) as f:
      kept = json.load(f)
    # Tables written before the set was recorded are all of the default set.
    if kept.pop("data", REAL) != args.data:
      raise SystemExit(f"--keep: {args.out} scores another set than --data {args.data}")
    rerun = {(name, os.path.normpath(w)) for name, _, w in (i.partition("=") for i in args.run)}
    groups = {
      name: [run for run in row["runs"] if (name, os.path.normpath(run["workdir"])) not in rerun]
      for name, row in kept.items()
      if name != "trivial"
    }
  for item in args.run:
    name, sep, workdir = item.partition("=")
    if not sep or not os.path.isdir(workdir):
      raise SystemExit(f"--run {item!r}: expected NAME=WORKDIR with an existing workdir")
    row = {"workdir": workdir, **_run_facts(workdir), **_real_scores(workdir, args.data)}
    groups.setdefault(name, []).append(row)
  header = ["name", "runs", "steps", "wall (min)"] + [title for _, title in COLUMNS]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  table = {}
  for name, rows in groups.items():
    cells = [name, str(len(rows)), "/".join(sorted({str(r["steps"]) for r in rows}))]
    cells.append(f"{sum(r['wall_min'] for r in rows) / len(rows):.0f}")
    table[name] = {"runs": rows}
    for key, _ in COLUMNS:
      text, mean, half = _spread([r[key] for r in rows])
      cells.append(text)
      table[name][key] = {"mean": mean, "half_range": half}
    print("| " + " | ".join(cells) + " |")
  trivial = next(iter(groups.values()))[0]["trivial"]
  for name in ("all_zero", "all_one"):
    scores = trivial[name]
    cells = [name, "-", "-", "-", f"{scores['iou']:.3f}", f"{scores['f1']:.3f}"]
    cells += [f"{scores['pixel_auc']:.3f}", "0.500", "0.500", "-"]
    print("| " + " | ".join(cells) + " |")
  table["trivial"] = trivial
  table["data"] = args.data
  if args.out:
    with open(args.out, "w") as f:
      json.dump(table, f, indent=1)


if __name__ == "__main__":
  main()
