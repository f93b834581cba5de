"""Configuration of whole jobs: the presets (`presets`) and the validation of a job config
(`validate`). Each config section's defaults and validator live beside the code that reads them
(the model section in `models/unet.py`, the data section in `data/config.py`, ...), written with
the shared value checks of `cdd_jax.config_checks`; this package composes them.
"""
