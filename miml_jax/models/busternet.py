"""BusterNet (Wu, AbdAlmageed, Natarajan, ECCV 2018): copy-move forgery localisation that tells
the source copy from the target copy. A Flax restatement of the official Keras model
(isi-vista/BusterNet, Model/BusterNetCore.py), read layer by layer:

* Preprocessing (the original's `Preprocess` layer): the image is resized to 256 x 256
  (`input_size`) with TF's bilinear resize, align_corners=True, and made VGG-"caffe": RGB -> BGR,
  minus the ImageNet means (103.939, 116.779, 123.68), no scaling (`caffe_preprocess`).
* Two branches with separate weights, each VGG16's blocks 1-4 (3x3 'same' convs with ReLU,
  a 2x2 max pool after each block: 256 -> 16 px, 512 channels).
  - Similarity (`simiDet`): per-pixel standardisation over channels (std floored at 1e-4),
    self-correlation X X^T / 512 of the 16 x 16 = 256 positions, percentile pooling (each row
    sorted descending, ranks round(linspace(1, 255, nb_pools)) kept: rank 0, the self match, is
    skipped), BatchNorm, then a decoder of BN-inception blocks and bilinear x2 upsamplings
    (align_corners=True) that concatenates the upsampled first decoder features at every scale:
    8 filters @16, 6 @32, 4 @64, 2 @128, 2 @256, a final 5/7/11 block of 2 each; 6 channels.
  - Manipulation (`maniDet`): the same trunk straight into the decoder, without the skip
    concatenations, its last block 5/7/11; 6 channels.
  Each branch has an auxiliary head, a 3x3 conv to 1 channel (sigmoid in the original), used only
  to train the branches (the released model cuts it off).
* Fusion: both 6-channel features concatenated -> BN-inception(3 filters, 1/3/5) -> 3x3 conv to
  3 channels, softmax; the probabilities are resized back to the input's size (align_corners).
* BN-inception (`BnInception`): parallel 'same' convs of k filters (linear), concatenated,
  BatchNorm (Keras: momentum 0.99, epsilon 1e-3, biased batch variance), ReLU. Keras initialisers
  (glorot-uniform kernels, zero biases).

The fused output's channels are, in the original's order, CHANNELS = (target, source, pristine).
The release disagrees with itself in name only: the USC-ISI data API (Data/USCISI-CMFD-Small/
api.py) stacks its 3-class ground truth as [target, source, background] ("R, G, B stand for
TARGET, SOURCE and BACKGROUND"), which is what the model was trained on; the CASIA notebook calls
channel 0 "src", but it scores the model's channel 0 against its own ground truth's channel 0,
so its 0.76 opt-in discernment accuracy only says the two agree, which they do if both follow
the training data's order. We keep the training data's order: channel 0 target, 1 source, 2
pristine. The binary forgery mask is pristine <= 0.5.

A caution the parameter counts settle: `create_cmfd_similarity_branch(nb_pools=100)` never passes
nb_pools on, so the pooling layer runs at its default, 256 ranks. The released branches have
7,735,568 (similarity) and 7,789,694 (manipulation) parameters, without their auxiliary heads,
which 256 ranks give and 100 would not; the whole released model has 15,526,813.

Departures and choices (all configurable; docs/baselines.md):

* The model returns logits (the fused 3-class and the two auxiliary ones), not probabilities:
  the task applies the softmax / sigmoid. Given an input of another size than `input_size`
  (training crops), it resizes in and resizes the logits back; the task's prediction path feeds
  `input_size` images and resizes the probabilities back, as the original does.
* `input_size` (256), `nb_pools` (256; 0 keeps every rank 1..N-1) and `vgg_widths` (VGG16's) are
  settings, so a narrow CPU model is the same code; `aux_heads=False` is the released inference
  model exactly (no auxiliary heads: what its weight file holds).
* `branch_bn='running'` makes the branches' BatchNorms use (and keep) their running statistics
  in training as well: the fusion stage of the staged recipe, whose branches are frozen.

Variables mirror the Keras layer names, the branch's name split off as the module: Keras
`simiDet_cnn_b1c1/kernel:0` is `params/simiDet/cnn_b1c1/kernel`, `simiDet_dconv_mpf_c0/bias:0` is
`params/simiDet/dconv_mpf/c0/bias`, `fusion_bn/moving_mean:0` is `batch_stats/fusion/bn/mean`,
`pred_mask/kernel:0` is `params/pred_mask/kernel`. Keras kernels are HWIO, the flax layout, so
weights copy as they are. `KERAS_LAYOUT` holds that map for the released file (registered with
keras_h5, so `miml-jax convert pretrained_busterNet.hd5` reads it); `vgg16_variables` maps the
Keras VGG16 ImageNet file (`vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5`, layers
block1_conv1 ... block4_conv3; block5 is not part of BusterNet) into both trunks.
"""

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.config import setting
from miml_jax.errors import UserInputError
from miml_jax.models import keras_h5
from miml_jax.models.common import as_dict, resolve_dtype

# The fused output's channels, in the original's order (see the module docstring).
CHANNELS = ("target", "source", "pristine")
# keras.applications.vgg16.preprocess_input ('caffe' mode): BGR means, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
VGG16_WIDTHS = (64, 128, 256, 512)
# Convs per VGG16 block (blocks 1-4).
VGG16_DEPTHS = (2, 2, 3, 3)
PATCHES = (1, 3, 5)
FINAL_PATCHES = (5, 7, 11)
# Keras BatchNormalization's defaults.
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3
# Published parameter counts (the released model, auxiliary heads cut off).
SIMILARITY_PARAMS, MANIPULATION_PARAMS, RELEASED_PARAMS = 7_735_568, 7_789_694, 15_526_813

keras_kernel_init = nn.initializers.glorot_uniform()


# ---- The original's fixed operations ------------------------------------------------------
def caffe_preprocess(images) -> jax.Array:
  """RGB images (uint8 or float, 0..255) -> float32 BGR minus the ImageNet means."""
  x = jnp.asarray(images).astype(jnp.float32)[..., ::-1]
  return x - jnp.asarray(CAFFE_MEAN_BGR, jnp.float32)


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 weights of TF1's bilinear resize with align_corners=True along one
  axis: output i samples input i * (n_in - 1) / (n_out - 1) (scale n_in / n_out for one output)."""
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else n_in / n_out
  src = np.arange(n_out, dtype=np.float64) * scale
  lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = src - lo
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def resize_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """(B, H, W, C) -> (B, h, w, C), TF1 bilinear with align_corners=True, in float32 (two small
  matrix products: exact for any ratio, and cheap at these sizes)."""
  height, width = x.shape[1:3]
  if (height, width) == tuple(size):
    return x
  mh = jnp.asarray(align_corners_matrix(height, size[0]))
  mw = jnp.asarray(align_corners_matrix(width, size[1]))
  highest = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,bhwc->bowc", mh, x.astype(jnp.float32), precision=highest)
  return jnp.einsum("pw,bowc->bopc", mw, y, precision=highest).astype(x.dtype)


def resize_align_corners_np(x: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """The same on the host for one (H, W) or (H, W, C) array; float32 out."""
  x = np.asarray(x, np.float32)
  height, width = x.shape[:2]
  if (height, width) == tuple(size):
    return x
  mh, mw = align_corners_matrix(height, size[0]), align_corners_matrix(width, size[1])
  y = np.tensordot(mh, x, axes=(1, 0))  # (h, W, ...)
  return np.moveaxis(np.tensordot(mw, y, axes=(1, 1)), 0, 1)  # (h, w, ...)


def std_norm_along_channels(x: jax.Array) -> jax.Array:
  """Per-pixel standardisation over channels, the population std floored at 1e-4."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  std = jnp.maximum(1e-4, jnp.sqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)))
  return (x - mean) / std


def percentile_ranks(nb_maps: int, nb_pools: int) -> np.ndarray:
  """The sorted-correlation ranks kept: round(linspace(1, nb_maps - 1, nb_pools)) as TF computes
  it (float32 start + i * step, round half to even), or every rank 1..nb_maps-1 for nb_pools=0.
  Rank 0, the largest correlation, is the position with itself, and is never kept."""
  if nb_pools == 0:
    return np.arange(1, nb_maps, dtype=np.int32)
  start, stop = np.float32(1.0), np.float32(nb_maps - 1)
  step = (stop - start) / np.float32(max(nb_pools - 1, 1))
  values = start + step * np.arange(nb_pools, dtype=np.float32)
  return np.round(values).astype(np.int32)


def self_correlation_percentile_pooling(x: jax.Array, nb_pools: int) -> jax.Array:
  """(B, h, w, C) standardised features -> (B, h, w, P): each position's correlations with all
  h * w positions (X X^T / C), sorted descending, at `percentile_ranks`."""
  batch, height, width, channels = x.shape
  flat = x.reshape(batch, height * width, channels).astype(jnp.float32)
  corr = jnp.einsum("bic,bjc->bij", flat, flat, precision=jax.lax.Precision.HIGHEST) / channels
  ranks = jnp.asarray(percentile_ranks(height * width, nb_pools))
  ordered = -jnp.sort(-corr, axis=-1)  # Descending, as tf.nn.top_k(k=all) sorts.
  pooled = jnp.take(ordered, ranks, axis=-1)
  return pooled.reshape(batch, height, width, ranks.shape[0])


def upsample2(x: jax.Array) -> jax.Array:
  """The original's BilinearUpSampling2D: x2, align_corners=True."""
  return resize_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))


# ---- Modules --------------------------------------------------------------------------------
def _batch_norm(
  name: str, use_running_average: bool, dtype, momentum: float = BN_MOMENTUM
) -> nn.BatchNorm:
  # Keras' BN: momentum 0.99, eps 1e-3, variance E[(x - mean)^2] (biased, also for the running
  # average, as Keras 2.0 keeps it).
  return nn.BatchNorm(
    use_running_average=use_running_average,
    momentum=momentum,
    epsilon=BN_EPSILON,
    use_fast_variance=False,
    dtype=dtype,
    name=name,
  )


def _conv(features: int, kernel: int, name: str, dtype) -> nn.Conv:
  return nn.Conv(
    features,
    (kernel, kernel),
    padding="SAME",
    kernel_init=keras_kernel_init,
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    name=name,
  )


class BnInception(nn.Module):
  """Parallel 'same' convs `c0`, `c1`, ... of `filters` each (no activation), concatenated,
  BatchNorm `bn`, ReLU."""

  filters: int
  kernels: tuple[int, ...] = PATCHES
  dtype: Any = jnp.float32
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    parts = [_conv(self.filters, k, f"c{i}", self.dtype)(x) for i, k in enumerate(self.kernels)]
    y = jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]
    return nn.relu(_batch_norm("bn", use_running_average, self.dtype, self.momentum)(y))


def _vgg_trunk(x: jax.Array, widths: Sequence[int], dtype) -> jax.Array:
  """VGG16 blocks 1-4 (the first len(widths) of them: the model always has 4), convs named
  cnn_b{block}c{conv} (inside the calling compact module)."""
  depths = VGG16_DEPTHS[: len(widths)]
  for block, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
    for conv in range(1, depth + 1):
      x = nn.relu(_conv(width, 3, f"cnn_b{block}c{conv}", dtype)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
  return x


class SimilarityBranch(nn.Module):
  """`simiDet`: -> (6-channel features at the input size, auxiliary logit or None)."""

  widths: tuple[int, ...] = VGG16_WIDTHS
  nb_pools: int = 256
  aux_head: bool = True
  dtype: Any = jnp.float32
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool):
    x = _vgg_trunk(x, self.widths, self.dtype)
    x = self_correlation_percentile_pooling(
      std_norm_along_channels(x.astype(jnp.float32)), self.nb_pools
    )
    x = _batch_norm("corr_bn", use_running_average, self.dtype, self.momentum)(x.astype(self.dtype))

    def inception(filters, name, kernels=PATCHES):
      return BnInception(filters, kernels, self.dtype, self.momentum, name=name)

    f16 = inception(8, "dconv_mpf")(x, use_running_average)
    f32 = upsample2(f16)
    dx32 = inception(6, "dconv_dx2")(f32, use_running_average)
    f64a = upsample2(f32)
    dx64 = inception(4, "dconv_dx4")(
      jnp.concatenate([f64a, upsample2(dx32)], -1), use_running_average
    )
    f128a = upsample2(f64a)
    dx128 = inception(2, "dconv_dx8")(
      jnp.concatenate([f128a, upsample2(dx64)], -1), use_running_average
    )
    f256a = upsample2(f128a)
    dx256 = inception(2, "dconv_dx16")(
      jnp.concatenate([f256a, upsample2(dx128)], -1), use_running_average
    )
    masks = inception(2, "dconv_dxF", FINAL_PATCHES)(
      jnp.concatenate([f256a, dx256], -1), use_running_average
    )
    aux = _conv(1, 3, "pred_mask", self.dtype)(masks) if self.aux_head else None
    return masks, aux


class ManipulationBranch(nn.Module):
  """`maniDet`: -> (6-channel features at the input size, auxiliary logit or None)."""

  widths: tuple[int, ...] = VGG16_WIDTHS
  aux_head: bool = True
  dtype: Any = jnp.float32
  momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool):
    x = _vgg_trunk(x, self.widths, self.dtype)
    for filters, name in ((8, "dconv_mpf"), (6, "dconv_dx2"), (4, "dconv_dx4"), (2, "dconv_dx8")):
      x = BnInception(filters, PATCHES, self.dtype, self.momentum, name=name)(
        x, use_running_average
      )
      x = upsample2(x)
    masks = BnInception(2, FINAL_PATCHES, self.dtype, self.momentum, name="dconv_dx16")(
      x, use_running_average
    )
    aux = _conv(1, 3, "dconv_pred_mask", self.dtype)(masks) if self.aux_head else None
    return masks, aux


@dataclasses.dataclass(frozen=True, kw_only=True)
class BusterNetConfig:
  """The `model` section of model.name='busternet' (see the module docstring)."""

  name: str = "busternet"
  dtype: str = "float32"
  # The side the image is resized to (the original's 256); a multiple of 32.
  input_size: int = 256
  # Percentile-pooling ranks (the released 256); 0 keeps every rank but the self match.
  nb_pools: int = 256
  # VGG16 block widths (the original's); narrower for CPU-sized runs.
  vgg_widths: tuple[int, int, int, int] = VGG16_WIDTHS
  # The branches' auxiliary heads (training); False is the released inference model.
  aux_heads: bool = True
  # 'batch': the branches' BatchNorms train on batch statistics; 'running': they use and keep
  # their running statistics (the fusion stage, branches frozen).
  branch_bn: str = "batch"
  # BatchNorm's running-average momentum (Keras' 0.99). A run of a few hundred steps needs
  # less: at 0.99 the statistics of step 160 still hold a fifth of their initial values.
  bn_momentum: float = setting(BN_MOMENTUM, ge=0, lt=1)


class BusterNet(nn.Module):
  """x: (B, H, W, 3) caffe-preprocessed images (`caffe_preprocess`) -> {'logits' (B, H, W, 3)
  in CHANNELS order; in training with aux_heads also 'similarity_logits' and
  'manipulation_logits' (B, H, W, 1)}."""

  input_size: int = 256
  nb_pools: int = 256
  vgg_widths: tuple[int, ...] = VGG16_WIDTHS
  aux_heads: bool = True
  branch_bn: str = "batch"
  bn_momentum: float = BN_MOMENTUM
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> "BusterNet":
    from miml_jax import config as config_lib

    cfg = config_lib.settings_from_config(BusterNetConfig, as_dict(model_config), "model")
    if cfg.input_size < 32 or cfg.input_size % 32:
      raise UserInputError(
        f"model.input_size: expected a multiple of 32 (the trunk's stride 16, and the "
        f"evaluation batches' padding), got {cfg.input_size}"
      )
    if cfg.nb_pools < 0:
      raise UserInputError(f"model.nb_pools: expected >= 0 (0: every rank), got {cfg.nb_pools}")
    if len(cfg.vgg_widths) != 4 or min(cfg.vgg_widths) < 1:
      raise UserInputError(f"model.vgg_widths: expected 4 positive widths, got {cfg.vgg_widths}")
    if cfg.branch_bn not in ("batch", "running"):
      raise UserInputError(f"model.branch_bn: expected 'batch' or 'running', got {cfg.branch_bn!r}")
    return cls(
      input_size=int(cfg.input_size),
      nb_pools=int(cfg.nb_pools),
      vgg_widths=tuple(int(w) for w in cfg.vgg_widths),
      aux_heads=bool(cfg.aux_heads),
      branch_bn=cfg.branch_bn,
      bn_momentum=float(cfg.bn_momentum),
      dtype=resolve_dtype(cfg.dtype),
    )

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected (B, H, W, 3) images, got {x.shape}")
    height, width = x.shape[1:3]
    size = (self.input_size, self.input_size)
    x = resize_align_corners(x.astype(jnp.float32), size).astype(self.dtype)
    branch_stats = not train or self.branch_bn == "running"
    momentum = self.bn_momentum
    simi, simi_aux = SimilarityBranch(
      self.vgg_widths, self.nb_pools, self.aux_heads, self.dtype, momentum, name="simiDet"
    )(x, branch_stats)
    mani, mani_aux = ManipulationBranch(
      self.vgg_widths, self.aux_heads, self.dtype, momentum, name="maniDet"
    )(x, branch_stats)
    fused = BnInception(3, PATCHES, self.dtype, momentum, name="fusion")(
      jnp.concatenate([simi, mani], axis=-1), not train
    )
    logits = _conv(len(CHANNELS), 3, "pred_mask", self.dtype)(fused)

    def back(y):  # Training crops of another size get their logits at their own size.
      return resize_align_corners(y.astype(jnp.float32), (height, width))

    out = {"logits": back(logits)}
    if train and self.aux_heads:
      out["similarity_logits"] = back(simi_aux)
      out["manipulation_logits"] = back(mani_aux)
    return out


def example_inputs(model: BusterNet) -> dict[str, jax.ShapeDtypeStruct]:
  size = model.input_size
  return {"x": jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)}


# ---- Keras weights ------------------------------------------------------------------------
_BN_LEAVES = {
  "gamma": "params/{}/scale",
  "beta": "params/{}/bias",
  "moving_mean": "batch_stats/{}/mean",
  "moving_variance": "batch_stats/{}/var",
}


def _conv_names(keras_layer: str, flax_module: str) -> dict[str, str]:
  return {
    f"{keras_layer}/kernel": f"params/{flax_module}/kernel",
    f"{keras_layer}/bias": f"params/{flax_module}/bias",
  }


def _bn_names(keras_layer: str, flax_module: str) -> dict[str, str]:
  return {f"{keras_layer}/{k}": v.format(flax_module) for k, v in _BN_LEAVES.items()}


def _inception_names(keras_layer: str, flax_module: str, count: int = 3) -> dict[str, str]:
  names = {}
  for i in range(count):
    names.update(_conv_names(f"{keras_layer}_c{i}", f"{flax_module}/c{i}"))
  names.update(_bn_names(f"{keras_layer}_bn", f"{flax_module}/bn"))
  return names


def _trunk_names(branch: str) -> dict[str, str]:
  names = {}
  for block, depth in enumerate(VGG16_DEPTHS, start=1):
    for conv in range(1, depth + 1):
      layer = f"cnn_b{block}c{conv}"
      names.update(_conv_names(f"{branch}_{layer}", f"{branch}/{layer}"))
  return names


def keras_names(aux_heads: bool = False) -> dict[str, str]:
  """Keras weight name (no ':0') -> '<collection>/<flax path>' of the whole model; with
  aux_heads, the branches' auxiliary heads too (the released file has none)."""
  names = {}
  for branch, blocks in (
    ("simiDet", ("mpf", "dx2", "dx4", "dx8", "dx16", "dxF")),
    ("maniDet", ("mpf", "dx2", "dx4", "dx8", "dx16")),
  ):
    names.update(_trunk_names(branch))
    if branch == "simiDet":
      names.update(_bn_names("simiDet_corr_bn", "simiDet/corr_bn"))
    for block in blocks:
      names.update(_inception_names(f"{branch}_dconv_{block}", f"{branch}/dconv_{block}"))
  if aux_heads:
    names.update(_conv_names("simiDet_pred_mask", "simiDet/pred_mask"))
    names.update(_conv_names("maniDet_dconv_pred_mask", "maniDet/dconv_pred_mask"))
  names.update(_inception_names("fusion", "fusion"))
  names.update(_conv_names("pred_mask", "pred_mask"))
  return names


# The released pretrained_busterNet.hd5 (no auxiliary heads): `miml-jax convert` reads it for a
# config with model.aux_heads=False (experiments/busternet.py:released).
KERAS_LAYOUT = keras_h5.KerasLayout(model="busternet", names=keras_names(aux_heads=False))
keras_h5.register_layout(KERAS_LAYOUT)

VGG16_LAYERS = tuple(
  f"block{block}_conv{conv}"
  for block, depth in enumerate(VGG16_DEPTHS, start=1)
  for conv in range(1, depth + 1)
)


def vgg16_variables(path: str, target: Mapping[str, Any]) -> dict[str, Any]:
  """{'params': both trunks' convs} from Keras' VGG16 ImageNet weights (layers block1_conv1 ...
  block4_conv3; block5's, which BusterNet does not have, are left out), shaped as `target`
  (an initialised or eval_shape-d variables tree). Strict otherwise: any other weight, a missing
  one, or a shape that differs from the model's (a narrowed `vgg_widths`) is a one-line error
  naming the file and the weight."""
  weights = keras_h5.read_keras_weights(path)
  flat = traverse_util.flatten_dict(dict(target["params"]))
  wanted = {}
  for layer, trunk_layer in zip(VGG16_LAYERS, _trunk_layer_names(), strict=True):
    for leaf in ("kernel", "bias"):
      wanted[f"{layer}/{leaf}"] = [(branch, trunk_layer, leaf) for branch in ("simiDet", "maniDet")]
  out, seen = {}, set()
  for key, value in weights.items():
    bare = key[: -len(":0")] if key.endswith(":0") else key
    if bare.startswith("block5_"):
      continue
    if bare not in wanted:
      raise UserInputError(f"{path}: {key} is not a weight of VGG16's blocks 1-4")
    for flax_path in wanted[bare]:
      if flax_path not in flat:
        raise UserInputError(f"{path}: the model has no {'/'.join(flax_path)} (for {key})")
      if tuple(flat[flax_path].shape) != tuple(np.shape(value)):
        raise UserInputError(
          f"{path}: {key} has shape {tuple(np.shape(value))}, the model's "
          f"{'/'.join(flax_path)} {tuple(flat[flax_path].shape)} (model.vgg_widths must be "
          f"VGG16's {VGG16_WIDTHS} to load it)"
        )
      out[flax_path] = np.asarray(value, flat[flax_path].dtype)
    seen.add(bare)
  missing = sorted(set(wanted) - seen)
  if missing:
    raise UserInputError(f"{path}: lacks VGG16 weight(s) {', '.join(missing[:4])}")
  return {"params": traverse_util.unflatten_dict(out)}


def _trunk_layer_names() -> list[str]:
  return [
    f"cnn_b{block}c{conv}"
    for block, depth in enumerate(VGG16_DEPTHS, start=1)
    for conv in range(1, depth + 1)
  ]


def write_vgg16_init(h5_path: str, config, out_path: str) -> int:
  """Writes an init file (`miml-jax train --init`) holding both trunks' VGG16 ImageNet weights
  for `config`'s BusterNet; returns the number of tensors written. `train --init` fills every
  other tensor from its own initialisation."""
  from miml_jax import models
  from miml_jax.models import convert

  model = models.build_model(config.model)
  target = models.abstract_variables(model, config)
  variables = vgg16_variables(h5_path, target)
  convert.save_init_file(out_path, variables, config.model, source=h5_path)
  return len(jax.tree_util.tree_leaves(variables))


def write_checkpoint_init(checkpoint_path: str, out_path: str) -> int:
  """Writes a training checkpoint's variables (a workdir, W/best, or one step's folder) as an
  init file: the staged recipe's hand-over, the branches trained in stage 1 starting stage 2
  (`miml-jax train --init`). Returns the number of tensors written."""
  from miml_jax import checkpoint
  from miml_jax.models import convert

  config, _, variables, step = checkpoint.load_model(checkpoint_path)
  if config.model.name != "busternet":
    raise UserInputError(f"{checkpoint_path}: a {config.model.name!r} checkpoint, not BusterNet's")
  variables = jax.tree_util.tree_map(np.asarray, jax.device_get(variables))
  convert.save_init_file(
    out_path, variables, config.model, source=f"{checkpoint_path} @ step {step}"
  )
  return len(jax.tree_util.tree_leaves(variables))


def main(argv: Sequence[str] | None = None) -> int:
  """Init files for BusterNet's training stages (`miml-jax train --init FILE`):

  vgg16 FILE.h5 --config CFG --out INIT   both trunks from Keras' VGG16 ImageNet weights (one
      Keras weight fills two trunks, which `miml-jax convert`'s one-name-one-tensor Keras
      layouts cannot say);
  checkpoint W --out INIT                 a trained checkpoint (stage 1's branches for stage 2).
  """
  import argparse
  import os
  import sys

  from miml_jax import config as config_lib

  parser = argparse.ArgumentParser(
    prog="python -m miml_jax.models.busternet",
    description=main.__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  commands = parser.add_subparsers(dest="command", required=True)
  vgg = commands.add_parser("vgg16", help="both trunks from VGG16 ImageNet weights")
  vgg.add_argument("weights", help="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
  vgg.add_argument("--config", required=True, help="experiments/busternet.py[:variant]")
  vgg.add_argument("--out", required=True, help="the init file to write")
  ckpt = commands.add_parser("checkpoint", help="a trained checkpoint's variables")
  ckpt.add_argument("checkpoint", help="a workdir, W/best or one step's folder")
  ckpt.add_argument("--out", required=True, help="the init file to write")
  args = parser.parse_args(argv)
  try:
    if os.path.exists(args.out):
      raise UserInputError(f"{args.out}: exists; choose another --out")
    if args.command == "vgg16":
      count = write_vgg16_init(args.weights, config_lib.load_config(args.config), args.out)
      what = "both trunks, VGG16 blocks 1-4"
    else:
      count = write_checkpoint_init(args.checkpoint, args.out)
      what = "the checkpoint's variables"
  except UserInputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.out}: {count} tensors ({what})")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
