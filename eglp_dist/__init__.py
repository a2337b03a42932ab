"""eglp_dist: distributed domain-adaptive / domain-generalised semantic segmentation.

Importing the package first applies :mod:`eglp_dist.compat`, so that torchvision (and
timm, which imports it) can be imported on CPU machines where the PyPI torchvision wheel
was built for CUDA.
"""
from eglp_dist import compat as _compat  # noqa: F401  (side effect: torchvision shim)

__version__ = "0.1.0"
