"""Using a distilled student on real images: the exported student folder (`student.py`), tiling
with one noise field and smooth blending (`tiling.py`), the `Upscaler` (`upscaler.py`) and image
files in and out (`images.py`). The command line is `python -m cdd_jax.upscale`."""
