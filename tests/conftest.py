"""Test setup: four fake CPU devices, so multi-device code runs without accelerators.

XLA reads the flag when JAX initialises its backends, so it must be set before anything
imports JAX; conftest.py is imported by pytest before any test module.
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The non-partitionable threefry lowering compiles about 3x faster on the CPU (model init: 5 s
# instead of 15 s); only the random streams differ, and every test compares like with like.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
# Persistent compilation cache: identical programs compiled by several tests (or by the CLI
# subprocesses) are compiled once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "simclr_jax_test_jax_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
