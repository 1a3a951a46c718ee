"""Shared test fixtures. JAX runs on CPU with several virtual devices so sharding code paths
are exercised; this must happen before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture
def shared_data():
  """../shared/data, or skip: a user's checkout has no ../shared."""
  if not os.path.isdir(SHARED_DATA):
    pytest.skip("../shared/data is absent")
  return SHARED_DATA


def pytest_configure(config):
  # Tests train the same tiny model several times; a session-wide XLA cache compiles it once.
  import tempfile

  os.environ.setdefault(
    "MIML_JAX_COMPILATION_CACHE", os.path.join(tempfile.gettempdir(), "miml_jax_test_xla_cache")
  )
