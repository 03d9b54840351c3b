"""Test setup: 8 fake CPU devices for mesh tests, float32 matmuls, slow marker."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same tiny programs; a persistent cache shares them
# across test files and across CI steps of one run.
# One location for the whole session; subprocess tests read the same variable.
os.environ.setdefault("DSJ_TEST_JAX_CACHE", "/tmp/deepseek_jax_test_cache")
jax.config.update("jax_compilation_cache_dir", os.environ["DSJ_TEST_JAX_CACHE"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--run-slow") or config.getoption("-m"):
    return
  skip = pytest.mark.skip(reason="slow: pass --run-slow (or -m slow)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
