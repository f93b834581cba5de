"""The config layer: the shared value checks, one validator per section, the presets."""

import ml_collections
import pytest

from cdd_jax import config_checks as checks
from cdd_jax.config.presets import STAGES, VARIANTS, preset
from cdd_jax.config.validate import validate_config


def _cfg(**kw):
    return ml_collections.ConfigDict(kw)


def test_number_checks_type_and_each_end_of_the_interval():
    c = _cfg(a=0.5, b=1, flag=True, nan=float("nan"))
    checks.number(c, "a", 0, 1)
    checks.number(c, "b", 1, integer=True)
    with pytest.raises(ValueError, match=r"x\.a must be in \(0.5, 1\], got 0.5"):
        checks.number(c, "a", 0.5, 1, lo_open=True, prefix="x.")
    with pytest.raises(ValueError, match=r"a must be in \[0, 0.5\), got 0.5"):
        checks.number(c, "a", 0, 0.5, hi_open=True)
    with pytest.raises(TypeError, match="a must be an int, got 0.5"):
        checks.number(c, "a", 0, integer=True)
    with pytest.raises(TypeError, match="flag must be a number, got True"):
        checks.number(c, "flag", 0)
    with pytest.raises(ValueError, match="nan"):
        checks.number(c, "nan", 0)


def test_choice_subset_and_positive_ints_name_the_key_and_the_valid_values():
    c = _cfg(mode="x", modes=("a", "a"), steps=(1, 0), sub=_cfg(k="z"))
    with pytest.raises(ValueError, match=r"p\.mode must be one of \('a', 'b'\), got 'x'"):
        checks.choice(c, "mode", ("a", "b"), prefix="p.")
    with pytest.raises(ValueError, match=r"sub\.k must be one of"):
        checks.choice(c, "sub.k", ("a",))
    with pytest.raises(ValueError, match="modes must be a tuple of distinct values"):
        checks.subset(c, "modes", ("a", "b"))
    with pytest.raises(ValueError, match=r"steps must be positive integers, got \(1, 0\)"):
        checks.positive_ints(c, "steps")


def test_check_keys_names_unknown_keys_with_close_matches_and_missing_ones():
    ref = _cfg(crop_size=1, batch_size=2, inner=_cfg(decay=0.9))
    with pytest.raises(ValueError, match=r"'data.crop_sise'; did you mean data.crop_size\?"):
        checks.check_keys(_cfg(crop_sise=1, batch_size=2, inner=_cfg(decay=0.9)), ref, "data.")
    with pytest.raises(ValueError, match=r"'data.inner.decya'; did you mean data.inner.decay"):
        checks.check_keys(_cfg(crop_size=1, batch_size=2, inner=_cfg(decya=1)), ref, "data.")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['batch_size'\]"):
        checks.check_keys(_cfg(crop_size=1, inner=_cfg(decay=0.9)), ref)
    checks.check_keys(_cfg(crop_size=1), ref, missing=False)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_preset_validates(stage, variant):
    config = preset(stage, variant)
    assert config.stage == stage
    validate_config(config)  # "large": its (-1, 8, 1) mesh fits the tests' 8 CPU devices


@pytest.mark.parametrize("section", ["model", "diffusion", "data", "optim", "ema", "train",
                                     "mesh", "control", "degradation", "distill", "evaluate"])
def test_an_unknown_key_in_any_section_is_named(section):
    config = preset("sr", "tiny")
    with config[section].unlocked():  # degradation sections are locked against typos
        config[section].unlikely_key = 1
    with pytest.raises(ValueError, match=rf"unknown config key '{section}\.unlikely_key'"):
        validate_config(config)


def test_one_default_per_value_the_presets_only_override():
    """lambda_x: the paper's 1 is the section default; the CPU default job overrides it (a
    documented deviation), the accelerator preset and Table 1 keep the default."""
    from cdd_jax.distill.config import distill_config

    assert distill_config().lambda_x == 1.0
    assert preset("sr", "default").distill.lambda_x == 100.0
    assert preset("sr", "large").distill.lambda_x == 1.0
    assert preset("table1", "default").distill.lambda_x == 1.0
    assert preset("table1", "default").control.anchor_precision == 0.0
