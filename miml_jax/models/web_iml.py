"""Web-IML: our documented reconstruction (docs/methods.md, Web-IML), not a published architecture.

Web-IML's layers are not public. Its public description names "Multi-Scale Perception" and
"Self-Rectification"; we build it in the APSC-Net lineage:

* multi-scale perception = the SE-gated fusion of the four pyramid levels plus ASPP over all
  scales (the `APSCHead`'s fusion and MSDEC);
* self-rectification = the iterative passes in which the model's previous prediction re-weights
  its features through the dynamic-kernel attention (`APSCHead.rectify_passes`).

`WebIML` = a configurable ConvNeXt `backbone` + the same `APSCHead` as `decode_head`. With
backbone preset 'base', drop_path_rate 0.4 and the default head it *is* APSC-Net (same parameter
tree). Every departure is a config switch so ablations can isolate it: the backbone size
(`model.backbone.preset` or dims/depths, `in_chans`), the fusion ('se' | 'sum'), the number of
rectification passes (0 = none), the image-level head, and the compute dtype. Web-supervision
aware training (soft-mask ignore band, per-source repeat factors; QES-weighted sampling is not
built yet) lives in the input pipeline and losses, not here.

Config (an ml_collections.ConfigDict or a plain dict):

    model.name = 'web_iml'
    model.backbone = dict(name='convnext', preset='base' | 'tiny' | ... | None,
                          dims=None | (d0, d1, d2, d3), depths=None | (n0, n1, n2, n3),
                          in_chans=3, drop_path_rate=0.4, layer_scale_init_value=1.0)
    model.head = dict(<any APSCHeadConfig field>)
    model.dtype = 'float32' | 'bfloat16'
    model.noise_view, model.trace_stem, model.dct_view: extra input views (fields below, jpeg.py)

Parameter naming is the APSC-Net one (torch state_dict keys 1:1, numeric indices joined to the
previous name with '_'); see naming.py.
"""

from collections.abc import Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError
from miml_jax.models import apsc_net, common, convnext, jpeg, layers, noise

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """The WebIML backbone. Only 'convnext' exists so far (a ViT option may be added)."""

  name: str = "convnext"
  dims: tuple[int, ...] = convnext.CONVNEXT_PRESETS["base"][0]
  depths: tuple[int, ...] = convnext.CONVNEXT_PRESETS["base"][1]
  in_chans: int = 3
  drop_path_rate: float = 0.4
  layer_scale_init_value: float = 1.0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any] | None) -> "BackboneConfig":
    """Builds from a dict / ConfigDict with an optional `preset`; unknown keys are errors."""
    d = dict(d or {})
    name = d.pop("name", "convnext")
    if name != "convnext":
      raise UserInputError(f"model.backbone.name: {name!r} is not supported (only 'convnext')")
    preset = d.pop("preset", None)
    dims, depths = d.pop("dims", None), d.pop("depths", None)
    if preset is None and dims is None and depths is None:
      preset = "base"
    dims, depths = convnext.convnext_dims_depths(preset, dims, depths)
    known = {"in_chans", "drop_path_rate", "layer_scale_init_value"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise UserInputError(
        f"model.backbone: unknown key(s) {unknown}; known: "
        f"{sorted(known | {'name', 'preset', 'dims', 'depths'})}"
      )
    return cls(name=name, dims=dims, depths=depths, **d)


# Learned residual filters of noise_view 'srm_bayar' (ManTra-Net's count).
BAYAR_FILTERS = 3


def _bayar_init(key, shape, dtype=jnp.float32):
  # Glorot-uniform, as Keras initialises ManTra-Net's, then constrained from the start.
  return noise.bayar_project(nn.initializers.glorot_uniform()(key, shape, dtype))


def project(model_config: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
  """Bayar's constraint on `bayar_kernel` after every update (ModelSpec.project); the identity
  for the other noise views."""
  if common.as_dict(model_config).get("noise_view") != "srm_bayar":
    return params
  return {**params, "bayar_kernel": noise.bayar_project(params["bayar_kernel"])}


class WebIML(nn.Module):
  """Configurable backbone + APSCHead; `__call__(x, train)` -> dict(logits, aux, image_logits).

  x is (B, H, W, in_chans), already normalised, H and W multiples of 32. `logits` are at 1/4 of
  the input resolution (float32; the caller upsamples), `aux` the deep-supervision logits,
  `image_logits` (B, 2) or None.
  """

  backbone: BackboneConfig = BackboneConfig()
  head: apsc_net.APSCHeadConfig = apsc_net.APSCHeadConfig()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # 'srm': the stem also sees the SRM residuals of each input channel (3 per channel);
  # 'srm_bayar': those and 3 learned Bayar-constrained residual filters.
  noise_view: str = "none"
  noise_view_gain: float = 10.0
  # Widths of full-resolution 3x3 conv + GELU layers before the backbone's stem; () = none.
  trace_stem: tuple[int, ...] = ()
  # The JPEG-domain view (jpeg.py), joined to the pixel channels before the stem; None = off.
  dct_view: jpeg.DCTViewConfig | None = None

  @classmethod
  def from_config(cls, model_config: Mapping[str, Any]) -> "WebIML":
    """Builds from the `model` section of a config (ConfigDict or dict)."""
    cfg = common.as_dict(model_config)
    known = set("name dtype backbone head noise_view noise_view_gain trace_stem dct_view".split())
    unknown = sorted(set(cfg) - known)
    if unknown:
      raise UserInputError(f"model: unknown key(s) {unknown} for web_iml; known: {sorted(known)}")
    head = apsc_net.APSCHeadConfig.from_dict(common.as_dict(cfg.get("head")))
    dct_view = jpeg.DCTViewConfig.from_dict(cfg.get("dct_view"))
    if dct_view is not None and dct_view.image_head and not head.image_head:
      raise UserInputError(
        "model.dct_view.image_head: needs the image head (model.head.image_head)"
      )
    return cls(
      backbone=BackboneConfig.from_dict(common.as_dict(cfg.get("backbone"))),
      head=head,
      dtype=common.resolve_dtype(cfg.get("dtype", "float32")),
      noise_view=cfg.get("noise_view", "none"),
      noise_view_gain=float(cfg.get("noise_view_gain", 10.0)),
      trace_stem=tuple(int(w) for w in cfg.get("trace_stem", ())),
      dct_view=dct_view,
    )

  @nn.compact
  def __call__(self, x: Array, train: bool) -> dict[str, Any]:
    bb = self.backbone
    common.check_image_input(x, bb.in_chans)
    image = x
    if self.noise_view == "srm_energy":
      # The local energy of those residuals (log scale), which survives the stem's LayerNorm.
      x = jnp.concatenate([x, noise.srm_energy(x).astype(x.dtype)], axis=-1)
    elif self.noise_view == "srm":
      # Our addition (not in APSC-Net): the SRM residuals of every input channel as extra stem
      # channels, scaled so that camera-level noise (a few grey levels, ~0.05 after ImageNet
      # normalisation) reaches the stem near unit scale.
      x = jnp.concatenate(
        [x, (noise.srm_residuals(x) * self.noise_view_gain).astype(x.dtype)], axis=-1
      )
    elif self.noise_view == "srm_bayar":
      # The SRM residuals and 3 learned Bayar-constrained 5x5 residual filters (ManTra-Net's
      # first-layer views; the constraint is `project`, applied after every update), both
      # scaled as above.
      kernel = self.param(
        "bayar_kernel", _bayar_init, (5, 5, x.shape[-1], BAYAR_FILTERS), self.param_dtype
      )
      bayar = jax.lax.conv_general_dilated(
        jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect"),
        kernel.astype(x.dtype),
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
      )
      residuals = jnp.concatenate([noise.srm_residuals(x).astype(x.dtype), bayar], axis=-1)
      x = jnp.concatenate([x, residuals * self.noise_view_gain], axis=-1)
    elif self.noise_view != "none":
      raise UserInputError(
        f"model.noise_view: {self.noise_view!r} is not 'none', 'srm', 'srm_bayar' or 'srm_energy'"
      )
    for i, width in enumerate(self.trace_stem):
      # Our addition (not in APSC-Net). ConvNeXt's stem is a linear 4x4/4 conv followed by a
      # per-position LayerNorm, which divides out how strong the local high-frequency content
      # is -- exactly the noise level that tells a pasted or re-processed region apart. A few
      # nonlinear full-resolution convs first let the stem's average see that energy.
      x = layers.conv2d(
        width,
        3,
        padding=1,
        in_features=x.shape[-1],
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"trace_stem_{i}",
      )(x)
      x = nn.gelu(x, approximate=False)
    histograms = None
    if self.dct_view is not None:
      view, histograms = jpeg.DCTView(self.dct_view, self.dtype, self.param_dtype, name="dct_view")(
        image
      )
      x = jnp.concatenate([x, view], axis=-1)
    feats = convnext.ConvNeXt(
      dims=bb.dims,
      depths=bb.depths,
      in_chans=x.shape[-1],
      drop_path_rate=bb.drop_path_rate,
      layer_scale_init_value=bb.layer_scale_init_value,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="backbone",
    )(x, train)
    out = apsc_net.APSCHead(self.head, self.dtype, self.param_dtype, name="decode_head")(
      feats, train
    )
    if histograms is not None and self.dct_view.image_head:
      detector = jpeg.HistogramDetector(
        self.dct_view.image_head,
        self.head.num_classes,
        self.dtype,
        self.param_dtype,
        name="dct_detector",
      )
      out = {**out, "image_logits": out["image_logits"] + detector(histograms)}
    return out
