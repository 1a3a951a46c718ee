"""IML models (flax linen, NHWC) and their registry.

`build_model(model_config)` turns the `model` section of a config into a module:

* 'apsc_net': the official APSC-Net (ConvNeXt-B + APSCHead). `model.head` may override head
  fields (e.g. image_head=False); `model.backbone` may set only in_chans and drop_path_rate.
* 'web_iml': our Web-IML reconstruction (configurable ConvNeXt + APSCHead), see web_iml.py.

Every model's variables map 1:1 onto the torch state_dict of the reference implementation; the
naming rule (numeric Sequential / ModuleList indices joined to the previous name with '_') is
documented and implemented in naming.py.
"""

from typing import Any, Callable, Dict, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from miml_jax.errors import UserInputError
from miml_jax.models import apsc_net
from miml_jax.models import web_iml
from miml_jax.models.apsc_net import APSCHead, APSCHeadConfig, APSCNet
from miml_jax.models.convnext import CONVNEXT_PRESETS, ConvNeXt
from miml_jax.models.web_iml import BackboneConfig, WebIML


def _build_web_iml(cfg: Mapping[str, Any]) -> nn.Module:
  return WebIML.from_config(cfg)


def _build_apsc_net(cfg: Mapping[str, Any]) -> nn.Module:
  backbone = web_iml.as_dict(cfg.get('backbone'))
  allowed = {'name', 'in_chans', 'drop_path_rate'}
  extra = sorted(set(backbone) - allowed)
  if extra or backbone.get('name', 'convnext') != 'convnext':
    raise UserInputError(f"model.backbone: APSC-Net's backbone is fixed (ConvNeXt-B); only "
                         f"{sorted(allowed - {'name'})} may be set, got {sorted(backbone)}. "
                         "Use model.name='web_iml' for other backbones")
  return APSCNet(
      in_chans=backbone.get('in_chans', 3),
      drop_path_rate=backbone.get('drop_path_rate', 0.4),
      head=APSCHeadConfig.from_dict(web_iml.as_dict(cfg.get('head'))),
      dtype=web_iml.resolve_dtype(cfg.get('dtype', 'float32')))


MODELS: Dict[str, Callable[[Mapping[str, Any]], nn.Module]] = {
    'web_iml': _build_web_iml,
    'apsc_net': _build_apsc_net,
}


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """The module named by `model_config.name` ('web_iml' or 'apsc_net'), configured from it."""
  cfg = web_iml.as_dict(model_config)
  name = cfg.get('name')
  if name not in MODELS:
    raise UserInputError(f'model.name: {name!r} is not one of {sorted(MODELS)}')
  return MODELS[name](cfg)


def _example_input(model_config) -> jax.ShapeDtypeStruct:
  # Parameter shapes do not depend on the spatial size (the dynamic-kernel generator resizes
  # to a fixed size), so the smallest legal input initialises every model.
  in_chans = web_iml.as_dict(model_config.get('backbone')).get('in_chans', 3)
  return jnp.zeros((1, 64, 64, in_chans), jnp.float32)


def init_variables(model: nn.Module, config, rng: jax.Array) -> Dict[str, Any]:
  """{'params', 'batch_stats'} of a freshly initialised model (jit it for speed)."""
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng},
                         _example_input(config.model), train=False)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def abstract_variables(model: nn.Module, config) -> Dict[str, Any]:
  """The shapes and dtypes of `init_variables`, without computing anything."""
  return jax.eval_shape(lambda r: init_variables(model, config, r), jax.random.PRNGKey(0))


def load(model: nn.Module, config, path: str, *, init_variables=None,
         partial: bool = False) -> tuple:
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
    raise UserInputError(f'{path}: lacks {len(missing)} of the model\'s tensors (e.g. '
                         f"{', '.join(missing[:3])}); it was converted with --partial, so it "
                         'can initialise training (train --init) but not be evaluated alone')
  return merged, missing


def count_params(variables: Mapping[str, Any]) -> int:
  """Number of scalars in the `params` collection (arrays or eval_shape structs)."""
  params = variables.get('params', variables)
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


__all__ = [
    'APSCHead', 'APSCHeadConfig', 'APSCNet', 'BackboneConfig', 'CONVNEXT_PRESETS', 'ConvNeXt',
    'MODELS', 'WebIML', 'abstract_variables', 'apsc_net', 'build_model', 'count_params',
    'init_variables', 'load', 'web_iml',
]
