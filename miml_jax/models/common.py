"""What every model's builder and forward pass share: config sections as plain dicts, the
compute dtype named in a config, and the check of an image batch against the network stride.

`resolve_dtype` turns the config's dtype name into a jnp dtype once, where a model is built
from its config (`from_config`, `build_model`); the module holds that dtype from then on.
"""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from miml_jax.errors import UserInputError

# The compute dtypes a config may name (`model.dtype`).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dict(c: Mapping[str, Any] | None) -> dict[str, Any]:
  """A ConfigDict / mapping / None as a plain (shallow) dict."""
  if c is None:
    return {}
  if hasattr(c, "to_dict"):
    return c.to_dict()
  return dict(c)


def resolve_dtype(name: Any) -> Any:
  """'float32' / 'bfloat16' / 'float16' (or a dtype, returned as is) -> a jnp dtype."""
  if not isinstance(name, str):
    return name
  if name not in DTYPES:
    raise UserInputError(f"model.dtype: {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def check_image_input(x: jax.Array, in_chans: int) -> None:
  """Raises unless x is (B, H, W, in_chans) with H and W multiples of 32 (the network stride)."""
  if x.ndim != 4 or x.shape[-1] != in_chans or x.shape[1] % 32 or x.shape[2] % 32:
    raise ValueError(
      f"expected (B, H, W, {in_chans}) input with H and W multiples of 32, got {x.shape}"
    )
