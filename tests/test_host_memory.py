"""host_memory.keep_freed_memory: large freed blocks are reused, not mapped afresh."""

import ctypes
import os
import subprocess
import sys

import pytest

from miml_jax import host_memory
from miml_jax.errors import UserInputError

# Fills a 256 MiB block twice and prints the page faults of the second time.
_PROBE = """
import resource, sys
import numpy as np
from miml_jax import host_memory
print(host_memory.keep_freed_memory())
for i in range(2):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.empty(1 << 26, np.float32)
  a.fill(1.0)
  del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _glibc() -> bool:
  return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallopt")


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
@pytest.mark.parametrize("choice", ["keep", "system"])
def test_freed_memory_is_reused_only_when_kept(choice):
  env = {**os.environ, host_memory.ENV: choice}
  out = subprocess.run(
    [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
  ).stdout.split()
  took_effect, faults = out[0] == "True", int(out[1])
  # numpy asks for transparent huge pages, so a fresh 256 MiB block costs at least 128 faults
  # (2 MiB pages) and up to 65536 (4 KiB); a reused one none.
  assert took_effect == (choice == "keep")
  if choice == "keep":
    assert faults < 16
  else:
    assert faults >= 128


def test_bad_choice_is_a_user_error(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "tcmalloc")
  with pytest.raises(UserInputError, match="MIML_JAX_HOST_MALLOC='tcmalloc'"):
    host_memory.keep_freed_memory()
