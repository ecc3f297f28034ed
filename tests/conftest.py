import os
import sys

# The persistent compilation cache roughly halves the suite's wall time on reruns.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import macro_jax  # noqa: E402,F401  (enables float64 before any test builds arrays)
