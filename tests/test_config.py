"""Model configuration: presets as the paper sets them, and invalid combinations named at construction."""

import pytest

from amos_ds.config import ModelConfig, get_preset, with_ablation


def test_presets_follow_the_paper():
    base = get_preset("base")
    assert (base.disc_layers, base.gen_layers, base.head_layers, base.hidden_size, base.vocab_size) == (
        12, 8, (4, 6, 8), 768, 32768)
    assert (base.num_heads, base.ffn_size, base.gumbel_tau, base.rtd_weight) == (12, 3072, 0.3, 50.0)
    assert get_preset("base_plus_plus").vocab_size == 64000
    small = get_preset("small")
    assert (small.disc_layers, small.gen_layers, small.head_layers, small.hidden_size) == (4, 4, (2, 3, 4), 256)
    tiny = get_preset("tiny")
    assert tiny.hidden_size == 64 and tiny.disc_layers in (2, 3)


@pytest.mark.parametrize("overrides, field", [
    (dict(head_layers=(4, 6, 10)), "head_layers"),
    (dict(head_layers=(0, 8)), "head_layers"),
    (dict(head_layers=(6, 4, 8)), "head_layers"),
    (dict(head_layers=()), "head_layers"),
    (dict(hidden_size=770), "hidden_size"),
    (dict(num_heads=0), "num_heads"),
    (dict(gen_layers=10), "gen_layers"),
    (dict(mixture="best"), "mixture"),
    (dict(mixture="layer_switch", switch_points=(0.5,)), "switch_points"),
    (dict(mixture="uniform", adv_mlm_scale=0.1), "adv_mlm_scale"),
    (dict(gumbel_tau=0.0), "gumbel_tau"),
    (dict(dropout=1.0), "dropout"),
    (dict(vocab_impl="cuda"), "vocab_impl"),
])
def test_invalid_combinations_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"^ModelConfig\.{field}: "):
        get_preset("base", **overrides)


def test_round_trip_through_a_dict_and_unknown_fields():
    config = with_ablation(get_preset("small"), "layer_switch")
    assert ModelConfig.from_dict(config.to_dict()) == config
    as_json_lists = dict(config.to_dict(), head_layers=[2, 3, 4])
    assert ModelConfig.from_dict(as_json_lists) == config
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"hidden": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("large")
    with pytest.raises(ValueError, match="unknown ablation"):
        with_ablation(config, "no_generator")
