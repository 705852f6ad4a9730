"""mae_jax: Masked Autoencoders (He et al. 2022) in JAX/Flax.

Importing the package changes nothing process-wide; programs that train or benchmark opt in to the
process settings with `mae_jax.runtime.configure()`.
"""

__version__ = "0.1.0"
