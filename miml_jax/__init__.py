"""miml-jax: image manipulation localization in JAX / Flax.

Reimplements the MIML line of research (CVPR 2024; arXiv 2508.20987): CAAA auto-annotation, QES,
Object Jitter, APSC-Net and Web-IML. See README.md for the command surface.
"""

__version__ = "0.1.0"
