"""Test setup: 8 fake CPU devices for mesh tests, float32 matmuls, slow marker."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is compile-bound (hundreds of small programs, each run a few
# times): XLA:CPU's backend optimisation level 0 halves its CPU time (LLVM's
# -O passes are most of a small program's compile) and changes no result: the
# HLO passes, hence the arithmetic, are the same. Subprocess tests inherit it
# through the environment. DSJ_TEST_XLA_OPT=1 keeps the default level.
# On jaxlib 0.10 (Python 3.11) the legacy fusion emitters also compile
# ~30% faster than the MLIR ones (test_attention + test_moe: 105 -> 76 s
# user CPU); their code may round differently, and every comparison in the
# suite is at a tolerance or between runs under the same flags. jaxlib 0.12
# no longer has the flag (an unknown XLA flag aborts the process).
def _fast_compile_flags() -> str:
  from importlib.metadata import version
  flags = " --xla_backend_optimization_level=0"
  if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
    flags += " --xla_cpu_use_fusion_emitters=false"
  return flags


if os.environ.get("DSJ_TEST_XLA_OPT") != "1" and \
    "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _fast_compile_flags()).strip()

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
# ... and every subprocess a test starts (CLI runs, notebooks, two-process
# runs) reads and fills the same cache: a resumed run, or a second run of a
# configuration another test ran, loads its programs instead of compiling.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["DSJ_TEST_JAX_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run tests marked slow")


def _torch_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


@pytest.hookimpl(trylast=True)   # after `-m` / `-k` have deselected what they will
def pytest_collection_modifyitems(config, items):
  # Tests marked `torch` check us against transformers' DeepseekV3. They never
  # skip quietly: without torch they must be deselected explicitly (-m "not
  # torch", as the Python 3.12+ CI leg does), otherwise the run stops here.
  needs_torch = [item.nodeid for item in items if "torch" in item.keywords]
  if needs_torch and not _torch_available():
    raise pytest.UsageError(
        f"{len(needs_torch)} selected tests need torch + transformers (marker `torch`, "
        f"e.g. {needs_torch[0]}), which are not installed. Install them with "
        "`pip install torch==2.13.0 && pip install -e \".[test,torch]\"` (Python 3.11: "
        "the CPU torch wheel), or deselect them with -m \"not torch\".")
  run_slow = config.getoption("--run-slow") or "slow" in (config.getoption("-m") or "")
  if run_slow:
    return
  skip = pytest.mark.skip(reason="slow: pass --run-slow (or -m slow)")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
