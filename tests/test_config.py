import pytest

from hc_retrofit import ConfigError, HCConfig


def test_json_round_trip():
    cfg = HCConfig(num_streams=8, variant="dynamic", width_init_main=0.9, sinkhorn_iters=5)
    assert HCConfig.from_json(cfg.to_json()) == cfg
    assert HCConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(num_streams=1), "num_streams must be >= 2"),
        (dict(num_streams=0), "num_streams must be >= 2"),
        (dict(num_streams=-3), "num_streams must be >= 2"),
        (dict(num_streams=2.5), "must be an integer"),
        (dict(variant="hyper"), "unknown variant 'hyper'"),
        (dict(sinkhorn_iters=0), "sinkhorn_iters"),
        (dict(num_streams=4, width_init_main=0.25), "symmetry lock"),
        (dict(variant="mhc", width_init_main=1.0), "width_init_main"),
        (dict(residual_init_main=1.0), "freezes learning"),
    ],
)
def test_invalid_settings_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        HCConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown HCConfig key"):
        HCConfig.from_dict({"num_streams": 4, "streams": 4})


def test_variant_defaults():
    assert HCConfig(variant="static").width_main == 1.0
    assert HCConfig(variant="mhc").width_main == 0.9
    assert HCConfig(variant="mhc").is_dynamic and not HCConfig(variant="mhc", mhc_dynamic=False).is_dynamic
    assert HCConfig(variant="dynamic").is_dynamic and not HCConfig(variant="static").is_dynamic
