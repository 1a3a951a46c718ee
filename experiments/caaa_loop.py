"""The whole MIMLv2 loop at CPU scale: train CAAA's three models on synthetic pairs made from
photos with instance masks, annotate pairs with them, build the annotated dataset, train a
single-image IML model (Web-IML) on it, and evaluate that model.

    python experiments/caaa_loop.py --workdir workdirs/loop                  # every stage below
    python experiments/caaa_loop.py --workdir workdirs/loop --ablate-qes --seeds 2
    python experiments/caaa_loop.py --workdir workdirs/loop_tiny --tiny      # what CI runs

runs these commands in order, each skipped if its output is complete, each resumable (W is the
workdir; COCO, WEB and CASIA default to this project's development data):

    miml-jax train --config experiments/caaa_loop.py:classifier --workdir W/classifier
    miml-jax train --config experiments/caaa_loop.py:dass --workdir W/dass
    miml-jax train --config experiments/caaa_loop.py:corr_dino --workdir W/corr_dino
    M="--classifier W/classifier --spg W/dass --sdg W/corr_dino \\
       --classifier-size 128 --spg-size 128 --sdg-size 64"
    miml-jax annotate --pairs pairs:WEB --out W/web $M
    miml-jax annotate --pairs "coco_spg:COCO+coco_sdg:COCO" --split validation \\
        --image-size 128 --recompress 70,95 --out W/held_out $M
    miml-jax data build mimlv2 --config annotations --manual-dir W/held_out --data-dir W/tfds
    miml-jax train --config experiments/caaa_loop.py:web_iml --workdir W/web_iml \\
        --config.data.train=tfds:W/tfds/mimlv2/annotations
    miml-jax eval --checkpoint W/web_iml --data benco:CASIA --out W/web_iml_eval --resize miml

`--sdg sacm` trains CAAA v1's SACM (`:sacm`) instead of CAAAv2's Corr-DINO as the SDG
annotator. `--ablate-qes` adds the same held-out pairs annotated without the QES filter
(`--qes-routes ''`: every annotation kept) into W/held_out_unfiltered, its dataset W/tfds_unfiltered
and W/web_iml_unfiltered trained and evaluated the same way; `--seeds N` trains each Web-IML
with seeds 0..N-1 (W/web_iml_seed1, ...; `--config.seed=K --config.data.seed=K`).

The stage configs are the CAAA experiments of their own (pair_classification.py, caaa_dass.py,
caaa_corr_dino.py, caaa_sacm.py) and the quickstart's Web-IML, with the data of this loop;
`:STAGE` and `:STAGE,tiny` name them (no stage: web_iml). Held-out pairs are the COCO 'val'
photos' edits and pastes, which none of the three models saw, each image JPEG-recompressed on
its own as web pairs are; their known masks score the annotations (report/report.md of each
annotate folder). The Web-IML stage trains on the annotations the QES filter kept, read back
through the TFDS builder, exactly as a user trains on MIMLv2. The 71 real web pairs are
annotated for inspection (their routes, QES distribution and contact sheet); they have no masks
to score, and the dataset is built from the held-out synthetic pairs so that the last stage
trains on annotations whose quality the report measures. The evaluation is on the 36 real
CASIA v1 samples, which no stage trains or tunes on.

Measured (this project's 2-core CPU VM, two other trainings sharing it): the first command
above, in one go, about 38 min. Its own models: the classifier's held-out route accuracy 0.886
(majority route 0.5), DASS held-out IoU 0.795 (all-one 0.119), Corr-DINO 0.243 (all-one 0.147).
Annotating the 600 held-out pairs (7.8 pairs/s): routing 0.960; SPG IoU 0.809 over all 295 (0.885
over the 144 QES keeps) against 0.650 for the trivial |authentic - forged| annotator; SDG 0.165
(0.591 over the 10 kept); 177 annotations kept. The 71 web pairs: 23 of the 25 same-size pairs
routed SPG, 38 of the 46 others SDG, 21 kept (experiments/reports/caaa_held_out_jpeg/ and
caaa_web/ are these two reports). Web-IML on the 177 kept annotations (300 steps), on CASIA:
per-image IoU 0.092 +- 0.003 over seeds 0 and 1 (mean +- half the range; all-one 0.076), F1
0.160, pixel AUC 0.60, image-level AUC 0.52 / 0.48 (head / map maximum: chance). The QES
ablation (`--ablate-qes --seeds 2`, the same 600 pairs, all kept): 0.088 +- 0.003, F1 0.154,
pixel AUC 0.60. The filter keeps 30 % of the annotations (their SPG IoU 0.885 against 0.809 for
all of them; SDG 0.591 against 0.165) and the model trained on them scores higher on CASIA in
both seeds, by less than the seeds' spread added up: at this scale QES removes bad labels
without costing the model anything, but 600 pairs cannot show that it helps more. Scored with
`python experiments/reports/transfer_table.py --run qes_filtered=W/web_iml --run
qes_filtered=W/web_iml_seed1 --run unfiltered=W/web_iml_unfiltered --run
unfiltered=W/web_iml_unfiltered_seed1` (each run's best/ checkpoint, chosen on the embedded
synthetic validation set).
"""

import argparse
import os
import sys

import ml_collections

import common  # noqa: F401  (the stage experiments import it from this folder)

HERE = os.path.dirname(os.path.abspath(__file__))
COCO = "../shared/data/coco_mini"
WEB = "../shared/data/web_pairs"
CASIA = "experiments/reports/casia1_samples.json"
STAGES = ("classifier", "dass", "corr_dino", "sacm", "web_iml")
# The SDG annotators the loop can train (--sdg): Corr-DINO is CAAAv2's, SACM is CAAA v1's.
SDG_STAGES = ("corr_dino", "sacm")
# Each annotator sees pairs at the size it was trained at.
SIZES = {False: dict(classifier=128, spg=128, sdg=64), True: dict(classifier=64, spg=64, sdg=64)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  # No stage: the loop's product, the single-image model (':tiny': its tiny twin).
  arg = {"": "web_iml", "tiny": "web_iml,tiny"}.get(arg or "", arg)
  stage, _, variant = arg.partition(",")
  if stage not in STAGES or variant not in ("", "tiny"):
    raise ValueError(
      f"experiments/caaa_loop.py: unknown variant {arg!r} (have: {', '.join(STAGES)}, each "
      f"also with ',tiny')"
    )
  tiny = variant == "tiny"
  sys.path.insert(0, HERE)
  if stage == "classifier":
    import pair_classification

    c = pair_classification.get_config("tiny" if tiny else None)
    photos = os.path.join(COCO, "images")
    c.data.train = c.data.validation = f"pair_synth:{photos}"
    if tiny:  # A handful of photos: validate on the training photos (plumbing only).
      c.data.pair_synth.holdout = 0.0
  elif stage == "dass":
    import caaa_dass

    c = caaa_dass.get_config("tiny" if tiny else None)
    c.data.train = c.data.validation = f"coco_spg:{COCO}"
  elif stage == "corr_dino":
    import caaa_corr_dino

    # The CPU-sized Corr-DINO (a frozen random 2-block ViT, so the decoder and the learned
    # projection do the work), with the settings its own experiment measured: a 16 x 16 patch
    # grid and a Dice term against the ~15 % pasted pixels.
    c = caaa_corr_dino.get_config("tiny")
    c.data.train = c.data.validation = f"coco_sdg:{COCO}"
    if tiny:  # CI's handful of photos: a batch smaller than the training pairs.
      c.input.batch_size = 2
      c.eval.batch_size = 2
    else:
      c.model.backbone.patch_size = 4
      c.loss.dice_weight = 1.0
      c.train.update(steps=600, eval_every=600, checkpoint_every=600, log_every=50)
  elif stage == "sacm":
    import caaa_sacm

    # The CPU-sized SACM, trained longer than CI's three steps.
    c = caaa_sacm.get_config("tiny")
    c.data.train = c.data.validation = f"coco_sdg:{COCO}"
    if tiny:  # CI's handful of photos: a batch smaller than the training pairs.
      c.input.batch_size = 2
    else:
      c.train.update(steps=300, eval_every=300, checkpoint_every=300, log_every=25)
  else:
    import quickstart

    c = quickstart.get_config()
    # Trained on the annotations (given on the command line: tfds:W/tfds/mimlv2/annotations),
    # validated on the embedded synthetic forgeries.
    if tiny:
      c.data.update(image_size=64, validation="synthetic:4")
      c.input.update(batch_size=2)
      c.input.augment.update(crop_size=64)
      c.model.backbone.update(dims=(8, 16, 16, 16))
      c.model.head.update(
        channels=8, feat0_channels=8, kernel_gen_dims=(4, 4, 4, 4, 4), kernel_gen_size=16
      )
      c.model.head.image_head_dims = (8, 8, 8)
      c.loss.ohem_min_kept = 1000
      c.train.update(steps=2, log_every=1, checkpoint_every=2, eval_every=0)
      c.eval.update(batch_size=2, num_pictures=2)
  return c


def commands(
  workdir: str,
  *,
  tiny: bool,
  coco: str,
  web: str | None,
  casia: str | None,
  sdg: str = "corr_dino",
  ablate_qes: bool = False,
  seeds: int = 1,
):
  """The loop's commands (argument lists of miml_jax.cli.main), with what each one writes."""
  if sdg not in SDG_STAGES:
    raise ValueError(f"caaa_loop: --sdg must be one of {', '.join(SDG_STAGES)}, not {sdg!r}")
  config = os.path.join(HERE, "caaa_loop.py")
  suffix = ",tiny" if tiny else ""

  def path(name):
    return os.path.join(workdir, name)

  def train(stage, *extra, workdir=None):
    data = {
      "classifier": [
        f"--config.data.train=pair_synth:{os.path.join(coco, 'images')}",
        f"--config.data.validation=pair_synth:{os.path.join(coco, 'images')}",
      ],
      "dass": [f"--config.data.train=coco_spg:{coco}", f"--config.data.validation=coco_spg:{coco}"],
      **{
        name: [f"--config.data.train=coco_sdg:{coco}", f"--config.data.validation=coco_sdg:{coco}"]
        for name in SDG_STAGES
      },
      "web_iml": [],
    }[stage]
    workdir = workdir or path(stage)
    argv = ["train", "--config", f"{config}:{stage}{suffix}", "--workdir", workdir]
    return (argv + data + list(extra), os.path.join(workdir, "metrics.json"))

  sizes = SIZES[tiny]
  annotators = ["--spg", path("dass"), "--sdg", path(sdg)]
  annotators += ["--classifier-size", str(sizes["classifier"]), "--spg-size", str(sizes["spg"])]
  annotators += ["--sdg-size", str(sizes["sdg"])]
  if tiny:  # Models trained for a few steps: keep every annotation, so the later stages run.
    annotators += ["--qes-routes", ""]
  models = ["--classifier", path("classifier"), *annotators]
  steps = [train("classifier"), train("dass"), train(sdg)]
  if web:
    web_run = ["annotate", "--pairs", f"pairs:{web}", "--out", path("web"), *models]
    steps.append((web_run, os.path.join(path("web"), "report", "summary.json")))
  # The QES-filtered annotations (the product), and with ablate_qes the same pairs kept
  # unfiltered: each annotated, built and trained on the same way.
  branches = [("", [])] + ([("_unfiltered", ["--qes-routes", ""])] if ablate_qes else [])
  for branch, filtering in branches:
    held_out = [
      "annotate",
      "--pairs",
      f"coco_spg:{coco}+coco_sdg:{coco}",
      "--split",
      "validation",
      "--image-size",
      str(sizes["spg"]),
      "--out",
      path("held_out" + branch),
      # Each image JPEG-recompressed on its own, as web pairs are: pixel-exact composites would
      # flatter the trivial |authentic - forged| annotator the report compares against.
      "--recompress",
      "70,95",
      # Tiny: every pair to the SPG annotator, so that the dataset is never empty (a classifier
      # trained three steps may route them anywhere); the web pairs above are classified.
      *(["--route", "spg", *annotators] if tiny else models),
      *filtering,
    ]
    steps.append((held_out, os.path.join(path("held_out" + branch), "report", "summary.json")))
    tfds_dir = path("tfds" + branch)
    build = ["data", "build", "mimlv2", "--config", "annotations"]
    build += ["--manual-dir", path("held_out" + branch), "--data-dir", tfds_dir]
    built = os.path.join(tfds_dir, "mimlv2", "annotations", "1.0.0", "dataset_info.json")
    steps.append((build, built))
    # An absolute path: a relative tfds: name is looked up under the TFDS data dir.
    annotations = os.path.abspath(os.path.join(tfds_dir, "mimlv2", "annotations"))
    for seed in range(seeds):
      name = "web_iml" + branch + (f"_seed{seed}" if seed else "")
      seeding = [f"--config.seed={seed}", f"--config.data.seed={seed}"] if seed else []
      train_data = f"--config.data.train=tfds:{annotations}"
      steps.append(train("web_iml", train_data, *seeding, workdir=path(name)))
      if casia:
        evaluate = ["eval", "--checkpoint", path(name), "--data", f"benco:{casia}"]
        evaluate += ["--out", path(name + "_eval"), "--resize", "miml"]
        steps.append((evaluate, os.path.join(path(name + "_eval"), "metrics.json")))
  return steps


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tiny", action="store_true", help="CI's few-step version")
  parser.add_argument("--coco", default=COCO, help="photos with instance masks (COCO format)")
  parser.add_argument("--web", default=WEB, help="real pairs in the CAAA layout ('' to skip)")
  parser.add_argument("--casia", default=CASIA, help="benco list to evaluate on ('' to skip)")
  parser.add_argument(
    "--sdg",
    default="corr_dino",
    choices=SDG_STAGES,
    help="the SDG annotator to train: Corr-DINO (CAAAv2's, the default) or SACM (CAAA v1's)",
  )
  parser.add_argument(
    "--ablate-qes",
    action="store_true",
    help="also annotate the held-out pairs without the QES filter, and train and evaluate the "
    "same Web-IML on those",
  )
  parser.add_argument("--seeds", type=int, default=1, help="Web-IML trainings per dataset")
  args = parser.parse_args(argv)
  if args.seeds < 1:
    parser.error("--seeds must be at least 1")
  from miml_jax import cli

  web = args.web if args.web and os.path.isdir(args.web) else None
  casia = args.casia if args.casia and os.path.isfile(args.casia) else None
  for command, output in commands(
    args.workdir,
    tiny=args.tiny,
    coco=args.coco,
    web=web,
    casia=casia,
    sdg=args.sdg,
    ablate_qes=args.ablate_qes,
    seeds=args.seeds,
  ):
    if os.path.exists(output):
      print(f"caaa_loop: done already: {' '.join(command[:2])} ({output})", file=sys.stderr)
      continue
    print(f"caaa_loop: miml-jax {' '.join(command)}", file=sys.stderr)
    code = cli.main(command)
    if code:
      return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
