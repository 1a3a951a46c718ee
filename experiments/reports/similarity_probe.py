"""Does a randomly initialised BusterNet trunk already match copies? For copy-moves of
coco_mini 'train' photos (`coco_copymove:`, 128 px), each cell of the trunk's grid is scored by
its best correlation with another cell (the first rank percentile pooling keeps) and the cells
at least half copy-move (source or target) are ranked against the rest: the cell AUC, for a few
trunk widths, 4 VGG blocks (stride 16, the model's) or 3, and inits.

    python experiments/reports/similarity_probe.py [--exact] [--images 64] [--inits 3]

`--exact`: translation-only copies (scale 1, no mirror). Measured on the project's 2-core VM:
AUC 0.45-0.53 with `--exact`, 0.44-0.57 without, in every setting (experiments/busternet.py,
"Why the similarity branch has nothing to start from").
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.input.sources import make_source
from miml_jax.metrics import ranked_auc
from miml_jax.models import busternet as bn

COCO = "../shared/data/coco_mini"
SIZE = 128


class Trunk(nn.Module):
  """BusterNet's VGG trunk (models/busternet.py), its first `blocks` blocks."""

  widths: tuple[int, ...]
  blocks: int

  @nn.compact
  def __call__(self, x):
    return bn._vgg_trunk(x, self.widths[: self.blocks], jnp.float32)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--exact", action="store_true", help="translation-only copies")
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--inits", type=int, default=3)
  args = parser.parse_args()
  forgery = {"scale_range": (1.0, 1.0), "flip_prob": 0.0} if args.exact else None
  source = make_source(f"coco_copymove:{COCO}", "train", image_size=SIZE, instance_forgery=forgery)
  images, masks = [], []
  for i in range(args.images):
    sample = source[i]
    copied = (sample["mask"] > 128) | (sample["source_mask"] > 128)
    if copied.any():  # Photos with no usable object stay authentic: nothing to match.
      images.append(sample["image"])
      masks.append(copied)
  x = bn.caffe_preprocess(np.stack(images))
  copied = np.stack(masks).astype(np.float32)
  print(f"{len(images)} copy-moves, copy-move fraction {copied.mean():.3f}")
  print("| widths | blocks | grid | cell AUC per init |\n|---|---|---|---|")
  for widths in ((16, 32, 64, 64), bn.VGG16_WIDTHS):
    for blocks in (4, 3):
      aucs = []
      for seed in range(args.inits):
        trunk = Trunk(tuple(widths), blocks)
        variables = trunk.init(jax.random.PRNGKey(seed), x[:1])
        features = bn.std_norm_along_channels(trunk.apply(variables, x))
        # Rank 1 of the model's own pooling: the best correlation but the self match.
        best = bn.self_correlation_percentile_pooling(features, 0)[..., 0]
        batch, side = best.shape[:2]
        step = SIZE // side
        cells = copied.reshape(batch, side, step, side, step).mean((2, 4)).reshape(-1) > 0.5
        aucs.append(ranked_auc(np.asarray(best).reshape(-1), cells))
      scores = " ".join(f"{a:.3f}" for a in aucs)
      print(f"| {'-'.join(map(str, widths))} | {blocks} | {side} x {side} | {scores} |")


if __name__ == "__main__":
  main()
