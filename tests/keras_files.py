"""Keras 2 weight files written the way Keras writes them, for the importer tests of
`models/keras_h5.py` (ManTraNet, BusterNet)."""

import h5py
import numpy as np


def write_keras_layers(
  path, layers: dict[str, dict[str, np.ndarray]], full_model: bool, keras_version: str
):
  """Root (or, for a full model as `model.save` writes it, 'model_weights') `layer_names`,
  each layer a group listing its weights (paths inside the group) in `weight_names`."""
  with h5py.File(path, "w") as f:
    group = f.create_group("model_weights") if full_model else f
    if full_model:
      f.attrs["model_config"] = b"{}"
    group.attrs["layer_names"] = [name.encode() for name in layers]
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = keras_version.encode()
    for name, weights in layers.items():
      g = group.create_group(name)
      g.attrs["weight_names"] = [key.encode() for key in weights]
      for key, value in weights.items():
        g.create_dataset(key, data=value)
