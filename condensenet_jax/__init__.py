"""condensenet_jax: CondenseNet (Huang et al., CVPR 2018) in JAX/Flax."""

from condensenet_jax import condense, flops, layers, models, torch_import

__all__ = ['condense', 'flops', 'layers', 'models', 'torch_import']
