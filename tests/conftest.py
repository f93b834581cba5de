"""Test setup: 8 simulated CPU devices (must be set before jax is imported); XLA's persistent
compilation cache off (the entry points turn it on in the user's cache folder; tests that
start them in a subprocess inherit this)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["CDD_JAX_COMPILATION_CACHE"] = "off"
