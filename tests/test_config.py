"""Config loading: presets validate, overrides parse, bad keys and values name themselves."""

import pytest

from fedlora_jax.config.run_config import config_diff, load_config


@pytest.mark.parametrize("preset", ["default", "tiny", "paper"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.name == preset and cfg.fl.clients_per_round <= cfg.fl.num_clients


def test_overrides_and_diff():
    base = load_config("tiny")
    cfg = load_config("tiny", ["fl.lr=3e-2", "lora.target_modules=q_proj,v_proj,o_proj", "dp.mode=local"])
    assert cfg.fl.lr == 0.03 and cfg.lora.target_modules == ("q_proj", "v_proj", "o_proj")
    assert config_diff(base, cfg) == ["dp.mode", "fl.lr", "lora.target_modules"]


@pytest.mark.parametrize(
    "sets, message",
    [
        (["fl.lr=fast"], "fl.lr must be a number, got 'fast'"),
        (["fl.rounds=2.5"], "fl.rounds must be an integer"),
        (["dp.delta=1"], "dp.delta must be in (0, 1)"),
        (["dp.clip_a=0"], "dp.clip_a must be > 0"),
        (["dp.epsilon=-1"], "dp.epsilon must be > 0"),
        (["nonsense"], "must look like key.sub=value"),
    ],
)
def test_bad_values(sets, message):
    with pytest.raises(ValueError) as e:
        load_config("tiny", sets)
    assert message in str(e.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="neither a file nor a preset; presets: default, paper, tiny"):
        load_config("nope")
