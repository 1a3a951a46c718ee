"""The whole MIMLv2 loop at CPU scale: train CAAA's three models on synthetic pairs made from
photos with instance masks, annotate pairs with them, build the annotated dataset, train a
single-image IML model (Web-IML) on it, and evaluate that model.

    python experiments/caaa_loop.py --workdir workdirs/caaa_loop          # every stage below
    python experiments/caaa_loop.py --workdir workdirs/caaa_loop_tiny --tiny  # what CI runs

runs these commands in order, each skipped if its output is complete, each resumable (W is the
workdir; COCO, WEB and CASIA default to this project's development data):

    miml-jax train --config experiments/caaa_loop.py:classifier --workdir W/classifier
    miml-jax train --config experiments/caaa_loop.py:dass --workdir W/dass
    miml-jax train --config experiments/caaa_loop.py:sacm --workdir W/sacm
    miml-jax annotate --pairs "coco_spg:COCO+coco_sdg:COCO" --split validation \\
        --image-size 128 --out W/held_out --classifier W/classifier --spg W/dass --sdg W/sacm \\
        --classifier-size 128 --spg-size 128 --sdg-size 64
    miml-jax annotate --pairs pairs:WEB --out W/web (same models and sizes)
    miml-jax data build mimlv2 --config annotations --manual-dir W/held_out --data-dir W/tfds
    miml-jax train --config experiments/caaa_loop.py:web_iml --workdir W/web_iml \\
        --config.data.train=tfds:W/tfds/mimlv2/annotations
    miml-jax eval --checkpoint W/web_iml --data benco:CASIA --out W/web_iml_eval

The stage configs are the CAAA experiments of their own (pair_classification.py, caaa_dass.py,
caaa_sacm.py) and the quickstart's Web-IML, with the data of this loop; `:STAGE` and
`:STAGE,tiny` name them (no stage: web_iml). Held-out pairs are the COCO 'val' photos' edits and
pastes, which none of the three models saw; their known masks score the annotations
(report/report.md of each annotate folder). The Web-IML stage trains on the annotations the QES
filter kept, read back through the TFDS builder, exactly as a user trains on MIMLv2. The 71 real
web pairs are annotated for inspection (their routes, QES distribution and contact sheet); they
have no masks to score, and the dataset is built from the held-out synthetic pairs so that the
last stage trains on annotations whose quality the report measures. The evaluation is on the 36
real CASIA v1 samples, which no stage trains or tunes on.

Measured so far (2-core CPU, shared): the loop's stages have been run one by one, not yet in one
go with this script's own three models. With the classifier of this loop's `:classifier` stage,
experiments/pair_segmentation.py's UPerNet for SPG and the tiny Corr-DINO for SDG, the
annotation of the 600 held-out pairs scores routing 0.958, SPG IoU 0.820 (0.905 over the pairs
QES keeps) against 0.650 for the trivial annotator, SDG IoU 0.168 (0.590 kept);
experiments/reports/README.md gives the commands and the rest. The dataset built from the 142
annotations QES kept there, and this file's `:web_iml` stage trained on it (300 steps, about 6
min), then scored on the 36 real CASIA v1 samples:

    miml-jax data build mimlv2 --config annotations --manual-dir W/held_out_jpeg --data-dir W/tfds
    miml-jax train --config experiments/caaa_loop.py:web_iml --workdir W/web_iml \\
        --config.data.train=tfds:$PWD/W/tfds/mimlv2/annotations
    miml-jax eval --checkpoint W/web_iml --data benco:experiments/reports/casia1_samples.json \\
        --resize miml

gives per-image IoU 0.106 against 0.076 for the all-one predictor (F1 0.172, pixel AUC 0.613),
but image-level AUC 0.47 (map maximum) / 0.52 (image head), chance; on the embedded synthetic
validation set IoU 0.101 against 0.128 all-one. The `:sacm` stage's CPU-sized
SACM has not yet learned its task (held-out IoU 0.02 against 0.15 all-one,
experiments/caaa_sacm.py), which is why that run used Corr-DINO.
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
STAGES = ("classifier", "dass", "sacm", "web_iml")
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


def commands(workdir: str, *, tiny: bool, coco: str, web: str | None, casia: str | None):
  """The loop's commands (argument lists of miml_jax.cli.main), with what each one writes."""
  config = os.path.join(HERE, "caaa_loop.py")
  suffix = ",tiny" if tiny else ""

  def path(name):
    return os.path.join(workdir, name)

  def train(stage, *extra):
    data = {
      "classifier": [
        f"--config.data.train=pair_synth:{os.path.join(coco, 'images')}",
        f"--config.data.validation=pair_synth:{os.path.join(coco, 'images')}",
      ],
      "dass": [f"--config.data.train=coco_spg:{coco}", f"--config.data.validation=coco_spg:{coco}"],
      "sacm": [f"--config.data.train=coco_sdg:{coco}", f"--config.data.validation=coco_sdg:{coco}"],
      "web_iml": [],
    }[stage]
    argv = ["train", "--config", f"{config}:{stage}{suffix}", "--workdir", path(stage)]
    return (argv + data + list(extra), os.path.join(path(stage), "metrics.json"))

  sizes = SIZES[tiny]
  annotators = ["--spg", path("dass"), "--sdg", path("sacm")]
  annotators += ["--classifier-size", str(sizes["classifier"]), "--spg-size", str(sizes["spg"])]
  annotators += ["--sdg-size", str(sizes["sdg"])]
  if tiny:  # Models trained for a few steps: keep every annotation, so the later stages run.
    annotators += ["--qes-routes", ""]
  models = ["--classifier", path("classifier"), *annotators]
  steps = [train("classifier"), train("dass"), train("sacm")]
  held_out = [
    "annotate",
    "--pairs",
    f"coco_spg:{coco}+coco_sdg:{coco}",
    "--split",
    "validation",
    "--image-size",
    str(sizes["spg"]),
    "--out",
    path("held_out"),
    # Tiny: every pair to the SPG annotator, so that the dataset is never empty (a classifier
    # trained three steps may route them anywhere); the web pairs below are classified.
    *(["--route", "spg", *annotators] if tiny else models),
  ]
  steps.append((held_out, os.path.join(path("held_out"), "report", "summary.json")))
  if web:
    web_run = ["annotate", "--pairs", f"pairs:{web}", "--out", path("web"), *models]
    steps.append((web_run, os.path.join(path("web"), "report", "summary.json")))
  build = ["data", "build", "mimlv2", "--config", "annotations"]
  build += ["--manual-dir", path("held_out"), "--data-dir", path("tfds")]
  built = os.path.join(path("tfds"), "mimlv2", "annotations", "1.0.0", "dataset_info.json")
  steps.append((build, built))
  # An absolute path: a relative tfds: name is looked up under the TFDS data dir.
  annotations = os.path.abspath(os.path.join(path("tfds"), "mimlv2", "annotations"))
  steps.append(train("web_iml", f"--config.data.train=tfds:{annotations}"))
  if casia:
    evaluate = ["eval", "--checkpoint", path("web_iml"), "--data", f"benco:{casia}"]
    evaluate += ["--out", path("web_iml_eval"), "--resize", "miml"]
    steps.append((evaluate, os.path.join(path("web_iml_eval"), "metrics.json")))
  return steps


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tiny", action="store_true", help="CI's few-step version")
  parser.add_argument("--coco", default=COCO, help="photos with instance masks (COCO format)")
  parser.add_argument("--web", default=WEB, help="real pairs in the CAAA layout ('' to skip)")
  parser.add_argument("--casia", default=CASIA, help="benco list to evaluate on ('' to skip)")
  args = parser.parse_args(argv)
  from miml_jax import cli

  web = args.web if args.web and os.path.isdir(args.web) else None
  casia = args.casia if args.casia and os.path.isfile(args.casia) else None
  for command, output in commands(
    args.workdir, tiny=args.tiny, coco=args.coco, web=web, casia=casia
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
