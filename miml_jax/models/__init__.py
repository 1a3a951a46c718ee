"""IML models (flax linen, NHWC) and their registry.

`build_model(model_config)` turns the `model` section of a config into a module:

* 'apsc_net': the official APSC-Net (ConvNeXt-B + APSCHead). `model.head` may override head
  fields (e.g. image_head=False); `model.backbone` may set only in_chans and drop_path_rate.
* 'web_iml': our Web-IML reconstruction (configurable ConvNeXt + APSCHead), see web_iml.py.
* 'upernet': a ConvNeXt or VAN + UPerHead (+ FCN aux) encoder-decoder of any input channels,
  e.g. 9 for pair segmentation (segmentor.py).
* 'pair_classifier': the CAAA pair classifier's ConvNeXt + 8-output head (pair_classifier.py).
* 'dass': CAAA's DASS annotator of in-place edits, VAN-B5 (or ConvNeXt) + UPerLab (dass.py).
* 'sacm': CAAA's SACM annotator of SDG pairs, siamese ConvNeXt-B UPerNet + correlation +
  DeepLabV3+ (sacm.py).
* 'corr_dino': CAAAv2's Corr-DINO SDG annotator (a reconstruction): frozen DINO / DINOv2 ViT
  features, SACM's correlation as a prior, a light decoder (corr_dino.py, vit.py).
* 'mantranet': ManTra-Net from the official Keras source, at full resolution (mantranet.py);
  its variables are named as the released .h5 files name them (keras_h5.py).
* 'busternet': BusterNet from the official Keras source, copy-move with source / target
  (busternet.py); its variables are named after the released .hd5 file's layers.

Each is registered (MODELS) with the task it is built for, the default of `config.task`.

Every model's variables map 1:1 onto the torch state_dict of the reference implementation; the
naming rule (numeric Sequential / ModuleList indices joined to the previous name with '_') is
documented and implemented in naming.py.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.models import apsc_net, busternet, common, mantranet, pair_classifier, web_iml
from miml_jax.models.apsc_net import APSCHead, APSCHeadConfig, APSCNet
from miml_jax.models.busternet import BusterNet
from miml_jax.models.convnext import CONVNEXT_PRESETS, ConvNeXt
from miml_jax.models.corr_dino import CorrDINO
from miml_jax.models.dass import DASS
from miml_jax.models.mantranet import ManTraNet
from miml_jax.models.pair_classifier import PairClassifier
from miml_jax.models.sacm import SACM
from miml_jax.models.segmentor import Segmentor
from miml_jax.models.web_iml import BackboneConfig, WebIML


def _build_apsc_net(cfg: Mapping[str, Any]) -> nn.Module:
  backbone = common.as_dict(cfg.get("backbone"))
  allowed = {"name", "in_chans", "drop_path_rate"}
  extra = sorted(set(backbone) - allowed)
  if extra or backbone.get("name", "convnext") != "convnext":
    raise UserInputError(
      f"model.backbone: APSC-Net's backbone is fixed (ConvNeXt-B); only "
      f"{sorted(allowed - {'name'})} may be set, got {sorted(backbone)}. "
      "Use model.name='web_iml' for other backbones"
    )
  return APSCNet(
    in_chans=backbone.get("in_chans", 3),
    drop_path_rate=backbone.get("drop_path_rate", 0.4),
    head=APSCHeadConfig.from_dict(common.as_dict(cfg.get("head"))),
    dtype=common.resolve_dtype(cfg.get("dtype", "float32")),
  )


def _image_input(in_chans: int) -> dict[str, jax.ShapeDtypeStruct]:
  # Parameter shapes do not depend on the spatial size (the dynamic-kernel generator resizes
  # to a fixed size), so the smallest legal input initialises every model.
  return {"x": jax.ShapeDtypeStruct((1, 64, 64, in_chans), jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: how to build it from the `model` section, the task it is built for
  (the default of `config.task`), and the named example inputs that initialise it."""

  build: Callable[[Mapping[str, Any]], nn.Module]
  task: str
  example_inputs: Callable[[nn.Module], dict[str, jax.ShapeDtypeStruct]]
  # (model section, params) -> params, applied after every optimiser update (Task.project):
  # constrained kernels (ManTra-Net's Bayar filters); None for none.
  project: Callable[[Mapping[str, Any], Any], Any] | None = None
  # A released checkpoint's key -> this module's torch-style key, where the official layout
  # differs from the module tree (the pair classifier's `norm` / `fc.3`); None: the same.
  official_key: Callable[[str], str] | None = None


MODELS: dict[str, ModelSpec] = {
  "web_iml": ModelSpec(
    WebIML.from_config,
    "segmentation",
    lambda m: _image_input(m.backbone.in_chans),
    web_iml.project,
  ),
  "apsc_net": ModelSpec(_build_apsc_net, "segmentation", lambda m: _image_input(m.in_chans)),
  "upernet": ModelSpec(
    Segmentor.from_config, "segmentation", lambda m: _image_input(m.backbone.in_chans)
  ),
  "pair_classifier": ModelSpec(
    PairClassifier.from_config,
    "pair_classification",
    lambda m: _image_input(m.in_chans),
    official_key=pair_classifier.official_key,
  ),
  "dass": ModelSpec(
    DASS.from_config, "pair_segmentation", lambda m: _image_input(m.backbone.in_chans)
  ),
  # SACM, CAAA's SDG annotator: two images in (authentic, forged), fixed input size.
  "sacm": ModelSpec(SACM.from_config, "sdg_segmentation", lambda m: m.example_inputs()),
  # Corr-DINO, CAAAv2's SDG annotator (our reconstruction): same contract as SACM.
  "corr_dino": ModelSpec(CorrDINO.from_config, "sdg_segmentation", lambda m: m.example_inputs()),
  # ManTra-Net (Keras official; its constraints are a projection after each update).
  "mantranet": ModelSpec(
    ManTraNet.from_config, "segmentation", lambda m: _image_input(3), mantranet.project
  ),
  # BusterNet (Keras official): copy-move with source / target; resizes to its input_size.
  "busternet": ModelSpec(BusterNet.from_config, "copy_move", busternet.example_inputs),
}


def model_spec(model_config: Mapping[str, Any]) -> ModelSpec:
  name = model_config.get("name")
  if name not in MODELS:
    raise UserInputError(f"model.name: {name!r} is not one of {sorted(MODELS)}")
  return MODELS[name]


def official_state_dict(model_config: Mapping[str, Any], state_dict: dict) -> dict:
  """A released checkpoint's state_dict with its keys in this model's layout (ModelSpec
  .official_key; unchanged for models whose layouts agree)."""
  rename = model_spec(model_config).official_key
  return state_dict if rename is None else {rename(k): v for k, v in state_dict.items()}


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """The module named by `model_config.name` (a key of MODELS), configured from it."""
  return model_spec(model_config).build(common.as_dict(model_config))


def example_inputs(model: nn.Module, model_config) -> dict[str, jax.ShapeDtypeStruct]:
  """The named inputs (shapes, dtypes) that initialise `model`: `model.init(rngs, **them)`."""
  return model_spec(model_config).example_inputs(model)


def init_variables(model: nn.Module, config, rng: jax.Array) -> dict[str, Any]:
  """{'params', 'batch_stats'} of a freshly initialised model (jit it for speed)."""
  params_rng, dropout_rng = jax.random.split(rng)
  inputs = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_inputs(model, config.model).items()}
  variables = model.init({"params": params_rng, "dropout": dropout_rng}, **inputs, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def abstract_variables(model: nn.Module, config) -> dict[str, Any]:
  """The shapes and dtypes of `init_variables`, without computing anything."""
  return jax.eval_shape(lambda r: init_variables(model, config, r), jax.random.PRNGKey(0))


def load(
  model: nn.Module, config, path: str, *, init_variables=None, partial: bool = False
) -> tuple:
  """(variables, missing) of `model` from an init file (`miml-jax convert`'s output).

  variables are numpy arrays; missing lists the leaves the file lacks (empty unless partial).

  With init_variables (a full tree, e.g. freshly initialised) and partial=True, leaves the file
  lacks keep their initial values (fine-tuning from a backbone-only checkpoint); otherwise the
  file must hold every leaf. The file must be for the same model (name) and every leaf it holds
  must exist in the model with the same shape; errors name the file and the leaf.
  """
  from miml_jax.models import convert

  loaded, metadata = convert.load_init_file(path)
  convert.check_same_model(path, metadata, config.model)
  # Without init_variables the file must fill every leaf, so shapes and dtypes are all the
  # base needs: no full tree of zeros is built only to be overwritten.
  base = init_variables if init_variables is not None else abstract_variables(model, config)
  merged, missing = convert.merge_variables(base, loaded, source=path)
  if missing and (not partial or init_variables is None):
    raise UserInputError(
      f"{path}: lacks {len(missing)} of the model's tensors (e.g. "
      f"{', '.join(missing[:3])}); it was converted with --partial, so it "
      "can initialise training (train --init) but not be evaluated alone"
    )
  return merged, missing


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of scalars in the `params` collection (arrays or eval_shape structs)."""
  params = variables.get("params", variables)
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
  "APSCHead",
  "APSCHeadConfig",
  "APSCNet",
  "BackboneConfig",
  "CONVNEXT_PRESETS",
  "ConvNeXt",
  "MODELS",
  "ModelSpec",
  "PairClassifier",
  "Segmentor",
  "WebIML",
  "example_inputs",
  "model_spec",
  "abstract_variables",
  "apsc_net",
  "build_model",
  "count_params",
  "init_variables",
  "load",
  "web_iml",
]
