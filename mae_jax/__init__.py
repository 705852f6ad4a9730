"""mae_jax: Masked Autoencoders (He et al. 2022) in JAX/Flax."""

import os

# TensorFlow (tf.data input only) prints INFO banners about oneDNN and CPU features on every start;
# warnings and errors still show. Set TF_CPP_MIN_LOG_LEVEL=0 to see them.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

__version__ = "0.1.0"
