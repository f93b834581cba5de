"""Real-ESRGAN second-order degradation on CPU (NumPy/OpenCV) and its grain transform.

cfg = degradation_config("realesrgan")
validate_degradation_config(cfg, crop_size=256)       # when the config is read
ds = grain.MapDataset.source(images).random_map(SRPairTransform(cfg, 256), seed=seed)
"""

from cdd_jax.data.degradations.config import (
    degradation_config,
    validate_degradation_config,
)
from cdd_jax.data.degradations.jpeg import jpeg_diff, jpeg_fast, quality_factor
from cdd_jax.data.degradations.kernels import (
    anisotropic_gaussian_kernel,
    generalized_gaussian_kernel,
    isotropic_gaussian_kernel,
    plateau_kernel,
    pulse_kernel,
    random_blur_kernel,
    random_final_sinc_kernel,
    random_mixed_kernel,
    sinc_kernel,
)
from cdd_jax.data.degradations.ops import (
    add_gaussian_noise,
    add_poisson_noise,
    filter2d,
    poisson_noise,
    quantize,
    resize,
    resize_aa_bicubic,
    scaled_size,
)
from cdd_jax.data.degradations.transform import SRPairTransform, degrade
from cdd_jax.data.degradations.usm import usm_sharpen

__all__ = [
    "SRPairTransform",
    "add_gaussian_noise",
    "add_poisson_noise",
    "anisotropic_gaussian_kernel",
    "degradation_config",
    "degrade",
    "filter2d",
    "generalized_gaussian_kernel",
    "isotropic_gaussian_kernel",
    "jpeg_diff",
    "jpeg_fast",
    "plateau_kernel",
    "poisson_noise",
    "pulse_kernel",
    "quality_factor",
    "quantize",
    "random_blur_kernel",
    "random_final_sinc_kernel",
    "random_mixed_kernel",
    "resize",
    "resize_aa_bicubic",
    "scaled_size",
    "sinc_kernel",
    "usm_sharpen",
    "validate_degradation_config",
]
