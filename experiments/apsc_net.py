"""APSC-Net, the MIML paper's (CVPR 2024) model and training recipe (docs/methods.md, APSC-Net).

The same recipe on CPU-sized inputs for a few steps (what CI runs): `--config
experiments/apsc_net.py:tiny`.

Score the official weights (APSC-Net.pth, 578 tensors) after converting them:

    miml-jax convert APSC-Net.pth --config experiments/apsc_net.py --out apsc_net.msgpack
    miml-jax eval --init apsc_net.msgpack --config experiments/apsc_net.py \
        --data folder:/data/CASIA1 --resize miml --threshold image_head

Train it (the paper: 8 GPUs x 2 images; here `input.batch_size` is the global batch), starting
from the FAIR UPerNet-ConvNeXt-B ADE20k checkpoint (backbone and the UPerHead layers APSC-Net
shares; the 150-class classifier and APSC-Net's own layers keep their fresh init):

    miml-jax convert upernet_convnext_base_ade20k.pth --config experiments/apsc_net.py \
        --partial --out ade20k_init.msgpack
    miml-jax train --config experiments/apsc_net.py --workdir W --init ade20k_init.msgpack \
        --config.data.train=folder:/data/MIML_Part1 --config.data.validation=folder:/data/CASIA1

Expected: the paper reports APSC-Net's per-benchmark IoU (e.g. CASIAv1); no official weights or
benchmark data are available on the machines this project is developed on, so that number has
not been reproduced here yet. The paper's data mix, with its repeat factors, is a mixture
string (input/sources.py), e.g. for MIML-layout folders and COCO for Object Jitter:

    --config.data.train='folder:/data/tampCOCO+folder:/data/MIML_Part1*6+folder:/data/MIML_Part2*4+coco:/data/coco*3+folder:/data/CASIAv2*80'
"""

import ml_collections

import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "tiny"):
    raise ValueError(f"experiments/apsc_net.py: unknown variant {arg!r} (have: tiny)")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "segmentation"
  steps = ml_collections.FieldReference(160_000)

  # The defaults of common.py are this recipe's: data, augmentation, loss, optimiser, schedule.
  c.data = common.data()
  c.input = common.input_pipeline()

  # ConvNeXt-B (drop path 0.4) + the official head (512 channels, 3 self-correction passes,
  # 31x31 dynamic kernels, image head): the parameter tree of APSC-Net.pth.
  c.model = dict(
    name="apsc_net", dtype="float32", backbone=dict(name="convnext", in_chans=3, drop_path_rate=0.4)
  )

  c.loss = common.loss()
  c.optim = common.optim(steps)
  c.mesh = common.mesh()
  c.train = common.train(steps)
  c.eval = common.evaluation()

  if arg == "tiny":
    # The real APSC-Net (its layout is fixed) on 64 x 64 crops of the embedded data for a few
    # steps: what CI runs to show the recipe trains, checkpoints and evaluates.
    steps.set(3)
    c.data.update(train="synthetic:8", validation="synthetic:2", image_size=64)
    c.input.update(batch_size=2, num_workers=0)
    c.input.augment.crop_size = 64
    c.loss.ohem_min_kept = 1000
    c.optim.warmup_steps = 1
    c.train.update(log_every=1, checkpoint_every=2, eval_every=0)
    c.eval.update(batch_size=2, resize="none", num_pictures=2)
  return c
