"""mae_jax: Masked Autoencoders (He et al. 2022) in JAX/Flax."""

import os

# TensorFlow (used for tf.data input only) logs C++ INFO lines (CPU features, tf.data buffer notes) on
# every run; hide them, keep warnings and errors. Set TF_CPP_MIN_LOG_LEVEL=0 to see them. (TF's oneDNN
# notice is printed before its logging is configured and still shows.)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

# Before JAX starts: keep freed host memory mapped (XLA:CPU re-faults its temporaries every step
# otherwise). See mae_jax/host_memory.py; MAE_JAX_KEEP_HOST_MEMORY=0 opts out.
from mae_jax import host_memory  # noqa: E402

host_memory.KEPT = host_memory.keep_freed_memory()

__version__ = "0.1.0"
