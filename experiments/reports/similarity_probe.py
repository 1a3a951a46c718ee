"""Does a BusterNet trunk match copies? For copy-moves of coco_mini photos (`coco_copymove:`,
128 px), each cell of the trunk's grid is scored by its best correlation with another cell (the
first rank percentile pooling keeps), and the cells at least half copy-move (source or target)
are ranked against the rest: the cell AUC. Beside it, how often a target cell's best match lies
in the source (and the chance of that: the source's share of the cells). For a few trunk widths,
4 VGG blocks (stride 16, the model's) or 3, and inits.

    python experiments/reports/similarity_probe.py [--exact] [--images 64] [--inits 3]
    python experiments/reports/similarity_probe.py --pretrain 300 --widths 16-32-64-64

`--exact`: translation-only copies (scale 1, no mirror). `--pretrain N`: first train each trunk
N steps (AdamW, batch 16) to match two views of the 'train' photos, then probe copy-moves of the
'validation' photos. The second view is the first rescaled by U(0.75, 1.25), mirrored with
p 0.5 and shifted, and it keeps that content only inside a random ellipse, another photo around
it: each first-view cell whose counterpart lies inside the ellipse must pick that counterpart
out of every cell of both views but itself (InfoNCE, temperature 0.1), so a cell's features
must follow its own content, not its surroundings, as a copy's must.

Measured on the project's 2-core VM: with random trunks, AUC 0.45-0.53 with `--exact`,
0.44-0.57 without, in every setting (experiments/busternet.py, "Why the similarity branch has
nothing to start from"); with `--pretrain 300 --widths 16-32-64-64`, AUC 0.46-0.48 while a
target's best match lies in its source 2-3x as often as chance (experiments/busternet.py).
"""

import argparse
import functools
import json
import os

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from miml_jax.input.sources import make_source
from miml_jax.metrics import ranked_auc
from miml_jax.models import busternet as bn

COCO = "../shared/data/coco_mini"
SIZE = 128
TEMPERATURE = 0.1
PRETRAIN_BATCH = 16


class Trunk(nn.Module):
  """BusterNet's VGG trunk (models/busternet.py), its first `blocks` blocks."""

  widths: tuple[int, ...]
  blocks: int

  @nn.compact
  def __call__(self, x):
    return bn._vgg_trunk(x, self.widths[: self.blocks], jnp.float32)


def features(trunk, variables, images) -> jax.Array:
  """uint8 (B, S, S, 3) -> the standardised features the self-correlation reads."""
  return bn.std_norm_along_channels(trunk.apply(variables, bn.caffe_preprocess(images)))


def cells_of(mask: np.ndarray, side: int) -> np.ndarray:
  """(B, S, S) bool -> (B, side * side): the cells at least half covered."""
  step = mask.shape[1] // side
  blocks = mask.astype(np.float32).reshape(len(mask), side, step, side, step)
  return blocks.mean((2, 4)).reshape(len(mask), -1) > 0.5


# ---- Two-view matching (--pretrain) ---------------------------------------------------------
@functools.cache
def train_photos(short_side: int = 200) -> list[np.ndarray]:
  with open(os.path.join(COCO, "annotations", "instances.json")) as f:
    images = json.load(f)["images"]
  photos = []
  for image in images:
    if image.get("split") == "train2017":
      photo = cv2.imread(os.path.join(COCO, "images", image["file_name"]))[..., ::-1]
      scale = short_side / min(photo.shape[:2])
      photos.append(cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA))
  return photos


def view_pair(photos, rng, side: int):
  """(first view, second view, each first-view cell's counterpart in the second or -1)."""
  step = SIZE // side
  photo = photos[rng.integers(len(photos))]
  height, width = photo.shape[:2]
  x0, y0 = int(rng.integers(0, width - SIZE + 1)), int(rng.integers(0, height - SIZE + 1))
  first = photo[y0 : y0 + SIZE, x0 : x0 + SIZE]
  scale, mirror = rng.uniform(0.75, 1.25), -1.0 if rng.random() < 0.5 else 1.0
  cx, cy = x0 + SIZE / 2 + rng.uniform(-24, 24), y0 + SIZE / 2 + rng.uniform(-24, 24)
  # Photo coordinates -> second-view coordinates.
  affine = np.array(
    [[mirror * scale, 0, SIZE / 2 - mirror * scale * cx], [0, scale, SIZE / 2 - scale * cy]]
  )
  second = cv2.warpAffine(
    np.ascontiguousarray(photo),
    affine,
    (SIZE, SIZE),
    flags=cv2.INTER_LINEAR,
    borderMode=cv2.BORDER_REFLECT,
  )
  other = photos[rng.integers(len(photos))]
  oy, ox = rng.integers(0, other.shape[0] - SIZE + 1), rng.integers(0, other.shape[1] - SIZE + 1)
  ellipse = np.zeros((SIZE, SIZE), np.uint8)
  centre = tuple(int(v) for v in rng.integers(24, SIZE - 24, 2))
  axes = tuple(int(v) for v in rng.integers(16, 48, 2))
  cv2.ellipse(ellipse, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
  second = np.where(ellipse[..., None] > 0, second, other[oy : oy + SIZE, ox : ox + SIZE])
  centres = np.arange(side) * step + step / 2 - 0.5
  gy, gx = np.meshgrid(centres, centres, indexing="ij")
  mapped = affine @ np.stack([gx.ravel() + x0, gy.ravel() + y0, np.ones(side * side)])
  cell = np.floor(mapped / step).astype(int)
  inside_view = ((cell >= 0) & (cell < side)).all(0)
  counterpart = np.where(inside_view, cell[1] * side + cell[0], 0)
  inside_ellipse = (ellipse.reshape(side, step, side, step).mean((1, 3)) > 0.75).reshape(-1)
  return first, second, np.where(inside_view & inside_ellipse[counterpart], counterpart, -1)


def pretrain(trunk, variables, steps: int, seed: int):
  photos = train_photos()
  side = SIZE // 2**trunk.blocks
  rng = np.random.default_rng(seed)
  optimizer = optax.adamw(
    optax.warmup_cosine_decay_schedule(0.0, 1e-3, 50, steps), weight_decay=1e-4
  )

  def loss_fn(variables, first, second, counterpart):
    a = features(trunk, variables, first).reshape(len(first), side * side, -1)
    b = features(trunk, variables, second).reshape(len(first), side * side, -1)
    across = jnp.einsum("bic,bjc->bij", a, b) / a.shape[-1]
    within = jnp.einsum("bic,bjc->bij", a, a) / a.shape[-1]
    within = jnp.where(jnp.eye(side * side, dtype=bool), -jnp.inf, within)  # Not itself.
    log_p = jax.nn.log_softmax(jnp.concatenate([across, within], -1) / TEMPERATURE, -1)
    valid = counterpart >= 0
    nll = -jnp.take_along_axis(log_p, jnp.maximum(counterpart, 0)[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

  @jax.jit
  def train_step(variables, state, first, second, counterpart):
    loss, grads = jax.value_and_grad(loss_fn)(variables, first, second, counterpart)
    updates, state = optimizer.update(grads, state, variables)
    return optax.apply_updates(variables, updates), state, loss

  state, losses = optimizer.init(variables), []
  for step in range(1, steps + 1):
    first, second, counterpart = zip(*(view_pair(photos, rng, side) for _ in range(PRETRAIN_BATCH)))
    variables, state, loss = train_step(
      variables, state, np.stack(first), np.stack(second), np.stack(counterpart)
    )
    losses.append(float(loss))
    if step % 100 == 0 or step == steps:
      print(
        f"  pretrain step {step}/{steps}: matching loss {np.mean(losses[-100:]):.3f}", flush=True
      )
  return variables


# ---- The probe ------------------------------------------------------------------------------
def copy_moves(split: str, count: int, exact: bool):
  forgery = {"scale_range": (1.0, 1.0), "flip_prob": 0.0} if exact else None
  source = make_source(f"coco_copymove:{COCO}", split, image_size=SIZE, instance_forgery=forgery)
  images, targets, sources = [], [], []
  for i in range(count):
    sample = source[i]
    target, copied_from = sample["mask"] > 128, sample["source_mask"] > 128
    if target.any():  # Photos with no usable object stay authentic: nothing to match.
      images.append(sample["image"])
      targets.append(target)
      sources.append(copied_from)
  return np.stack(images), np.stack(targets), np.stack(sources)


def probe(trunk, variables, images, targets, sources) -> tuple[float, float, float]:
  """(cell AUC, target cells' best match in the source, that chance)."""
  f = features(trunk, variables, images)
  side = f.shape[1]
  # Rank 1 of the model's own pooling: the best correlation but the self match.
  best = np.asarray(bn.self_correlation_percentile_pooling(f, 0)[..., 0]).reshape(len(f), -1)
  flat = np.asarray(f).reshape(len(f), side * side, -1)
  corr = np.einsum("bic,bjc->bij", flat, flat)
  corr[:, np.arange(side * side), np.arange(side * side)] = -np.inf
  best_match = corr.argmax(-1)
  target_cells, source_cells = cells_of(targets, side), cells_of(sources, side)
  auc = ranked_auc(best.reshape(-1), target_cells | source_cells)
  in_source = np.take_along_axis(source_cells, best_match, axis=1)[target_cells]
  return auc, float(in_source.mean()), float(source_cells.mean())


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--exact", action="store_true", help="translation-only copies")
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--inits", type=int, default=3)
  parser.add_argument("--pretrain", type=int, default=0, help="two-view matching steps first")
  parser.add_argument(
    "--widths", default="16-32-64-64,64-128-256-512", help="trunk widths, comma-separated"
  )
  args = parser.parse_args()
  split = "validation" if args.pretrain else "train"
  images, targets, sources = copy_moves(split, args.images, args.exact)
  fraction = (targets | sources).mean()
  print(f"{len(images)} copy-moves of '{split}' photos, copy-move fraction {fraction:.3f}")
  rows = []
  for widths in [tuple(int(w) for w in ws.split("-")) for ws in args.widths.split(",")]:
    for blocks in (4, 3):
      scores = []
      for seed in range(args.inits):
        trunk = Trunk(widths, blocks)
        variables = trunk.init(jax.random.PRNGKey(seed), images[:1])
        if args.pretrain:
          variables = pretrain(trunk, variables, args.pretrain, seed)
        scores.append(probe(trunk, variables, images, targets, sources))
      side = SIZE // 2**blocks
      cells = " ".join(f"{auc:.3f} ({hit:.2f} / {chance:.2f})" for auc, hit, chance in scores)
      rows.append(f"| {'-'.join(map(str, widths))} | {blocks} | {side} x {side} | {cells} |")
      print(rows[-1], flush=True)
  print("| widths | blocks | grid | per init: cell AUC (target's best match in source / chance) |")
  print("|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
  main()
