"""Test setup: four fake CPU devices, so multi-device code runs without accelerators.

XLA reads the flag when JAX initialises its backends, so it must be set before anything
imports JAX; conftest.py is imported by pytest before any test module.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
