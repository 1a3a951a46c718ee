"""What annotating a million web pairs costs with CAAAv2's annotators at their released sizes.

    python benchmarks/annotate_cost.py [--batch 8] [--dtype float32|bfloat16] [--spg-share 0.4]
        [--mfu 0.3] [--time] [--out benchmarks/results/annotate_cost.json]

Per pair, `miml-jax annotate` runs the pair classifier once and then one annotator with the
official flip test-time augmentation (three forward passes): DASS for in-place edits (SPG),
Corr-DINO or SACM for pasted donors (SDG). This script builds each at its released size
(the ConvNeXt-XL classifier at 512, DASS VAN-B5 at 1024, Corr-DINO ViT-S/16 at 448, SACM
ConvNeXt-B at 512: the annotate defaults), lowers the exact jitted steps `annotate` runs
(annotate.classify_fn / annotate_fn, QES included) with random weights, and reads XLA's FLOP
count of each. From those:

- FLOPs per pair = classifier + spg_share x DASS step + (1 - spg_share) x SDG step;
- an estimate of pairs/s and of the hours per million pairs for each accelerator of
  miml_jax.mfu's peak table, at an assumed model FLOPs utilisation (`--mfu`, 0.3 by default: an
  inference-only, batch-8 workload reaches less than training does). These are estimates from
  counted FLOPs, not measurements, and the table says so.

`--tiny` does the same with the experiments' CI-sized twins at 64 px (what the tests run).
`--time` also runs each step (batch `--batch` per device, after a warm-up, median of 3) on the
local devices and reports the measured pairs/s beside the estimate: the figure to trust on an
accelerator. On this project's CPU that takes many minutes per model at these sizes; the CPU
throughput of `annotate` itself is in docs/caaa.md.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "experiments"))

from miml_jax import annotate, bench, mfu, models, tasks  # noqa: E402
from miml_jax import config as config_lib  # noqa: E402

EXPERIMENTS = os.path.join(HERE, "..", "experiments")
# name -> (experiment config, its model section at the released size or None: the config's own,
# square input size, the annotate role).
ANNOTATORS = {
  "classifier": ("pair_classification.py", {"name": "pair_classifier"}, 512, "classifier"),
  "dass": ("caaa_dass.py:released", None, 1024, "spg"),
  "corr_dino": ("caaa_corr_dino.py", None, 448, "sdg"),
  "sacm": ("caaa_sacm.py", None, 512, "sdg"),
}
# --tiny: the experiments' CI-sized twins at 64 px, to prove the script runs.
TINY = {
  "classifier": ("pair_classification.py:tiny", None, 64, "classifier"),
  "dass": ("caaa_dass.py:tiny", None, 64, "spg"),
  "corr_dino": ("caaa_corr_dino.py:tiny", None, 64, "sdg"),
  "sacm": ("caaa_sacm.py:tiny", None, 64, "sdg"),
}


def _model(name: str, dtype: str, tiny: bool = False):
  spec, model_section, size, role = (TINY if tiny else ANNOTATORS)[name]
  config = config_lib.load_config(os.path.join(EXPERIMENTS, spec))
  if model_section is not None:
    config.model = dict(model_section)
  config.model.dtype = dtype
  config = tasks.validate_config(config)
  module = models.build_model(config.model)
  variables = models.abstract_variables(module, config)
  return annotate.Model(config, module, variables, name), size, role


def _step(model: annotate.Model, role: str):
  if role == "classifier":
    return annotate.classify_fn(model)
  # Flips and their reduction as `annotate` uses them for the role (the official scripts').
  defaults = annotate.AnnotateConfig()
  reduce = defaults.spg_tta if role == "spg" else defaults.sdg_tta
  return annotate.annotate_fn(model, flip_authentic=role == "spg", reduce=reduce, tta=True)


def measure(name: str, batch: int, dtype: str, timed: bool, tiny: bool = False) -> dict:
  model, size, role = _model(name, dtype, tiny)
  fn = jax.jit(_step(model, role))
  images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  lowered = fn.lower(model.variables, {"authentic": images, "forged": images})
  flops = (lowered.cost_analysis() or {}).get("flops")
  row = {
    "annotator": name,
    "role": role,
    "size": size,
    "parameters": int(
      sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(model.variables["params"]))
    ),
    "flops_per_pair": float(flops) / batch if flops else None,
  }
  if timed:
    variables = models.init_variables(model.module, model.config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    data = {
      key: jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
      for key in ("authentic", "forged")
    }
    start = time.perf_counter()
    compiled = lowered.compile()  # The program lowered above, for these shapes.
    row["compile_s"] = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, data))
    times = []
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled(variables, data))
      times.append(time.perf_counter() - start)
    row["step_s"] = statistics.median(times)
    row["pairs_per_s"] = batch / row["step_s"]
  return row


def estimate(rows: dict, spg_share: float, sdg: str, utilisation: float) -> dict:
  per_pair = rows["classifier"]["flops_per_pair"]
  per_pair += spg_share * rows["dass"]["flops_per_pair"]
  per_pair += (1 - spg_share) * rows[sdg]["flops_per_pair"]
  out = {"sdg_annotator": sdg, "flops_per_pair": per_pair, "accelerators": {}}
  for kind, peak in mfu.PEAK_BF16_FLOPS:
    pairs_per_s = peak * utilisation / per_pair
    out["accelerators"][kind] = {
      "peak_bf16_flops": peak,
      "pairs_per_s": pairs_per_s,
      "hours_per_million_pairs": 1e6 / pairs_per_s / 3600,
    }
  return out


def table(result: dict) -> str:
  lines = ["| annotator | role | size | parameters | GFLOP per pair | measured pairs/s |"]
  lines.append("|---|---|---|---|---|---|")
  for row in result["annotators"].values():
    measured = f"{row['pairs_per_s']:.2f}" if "pairs_per_s" in row else "-"
    lines.append(
      f"| {row['annotator']} | {row['role']} | {row['size']} | {row['parameters']:,} | "
      f"{row['flops_per_pair'] / 1e9:.4g} | {measured} |"
    )
  lines.append("")
  share, util = result["spg_share"], result["assumed_mfu"]
  lines.append(
    f"Estimate (counted FLOPs at an assumed {util:.0%} of the bf16 peak; SPG share {share:.0%}), "
    "one device:"
  )
  lines.append("")
  lines.append(
    "| accelerator | SDG annotator | TFLOP per pair | pairs/s | hours per million pairs |"
  )
  lines.append("|---|---|---|---|---|")
  for est in result["estimates"]:
    for kind, acc in est["accelerators"].items():
      lines.append(
        f"| {kind} | {est['sdg_annotator']} | {est['flops_per_pair'] / 1e12:.3g} | "
        f"{acc['pairs_per_s']:.1f} | {acc['hours_per_million_pairs']:.1f} |"
      )
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8, help="pairs per step (annotate's default)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument(
    "--spg-share",
    type=float,
    default=0.4,
    help="share of pairs routed to DASS (the 71 real web pairs here: 25 of equal size)",
  )
  parser.add_argument("--mfu", type=float, default=0.3, help="assumed utilisation for estimates")
  parser.add_argument("--time", action="store_true", help="also run each step on this machine")
  parser.add_argument("--annotators", default=",".join(ANNOTATORS))
  parser.add_argument("--tiny", action="store_true", help="CI-sized models at 64 px")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "annotate_cost.json"))
  args = parser.parse_args(argv)
  if not 0 <= args.spg_share <= 1 or not 0 < args.mfu <= 1:
    parser.error("--spg-share must be in [0, 1] and --mfu in (0, 1]")
  names = args.annotators.split(",")
  unknown = sorted(set(names) - set(ANNOTATORS))
  if unknown:
    parser.error(f"--annotators: unknown {unknown} (have: {', '.join(ANNOTATORS)})")
  rows = {}
  for name in names:
    print(f"annotate_cost: {name} ...", file=sys.stderr, flush=True)
    rows[name] = measure(name, args.batch, args.dtype, args.time, args.tiny)
  result = {
    "machine": bench.machine(),
    "batch": args.batch,
    "dtype": args.dtype,
    "spg_share": args.spg_share,
    "assumed_mfu": args.mfu,
    "tiny": args.tiny,
    "annotators": rows,
    "estimates": [
      estimate(rows, args.spg_share, sdg, args.mfu)
      for sdg in ("corr_dino", "sacm")
      if {"classifier", "dass", sdg} <= set(rows)
    ],
  }
  print(table(result))
  bench.write_json(result, args.out)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
