"""TrainConfig (defaults < --config file < flags) and the DeepSpeed config derived for a world size."""

import json

import pytest

from amos_ds.errors import ConfigError
from amos_ds.train.ds_config import (
    derive_ds_config,
    gradient_accumulation,
    load_ds_config,
    precision,
    scheduler_total_steps,
)
from amos_ds.train.train_config import DS_CONFIG_DIR, TrainConfig, build_parser, load_train_config


def parse(*flags: str) -> TrainConfig:
    return load_train_config(build_parser().parse_args(list(flags)))


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "tiny", "seed": 7, "save_every": 5, "keep_last": 2}))
    config = parse("--config", str(tmp_path / "c.json"), "--seed", "9", "--local_rank=1", "--fp32")
    assert (config.preset, config.seed, config.save_every, config.keep_last, config.fp32) == ("tiny", 9, 5, 2, True)
    assert config.resume == "auto" and config.data == []
    assert parse("--data", "a", "b:0.3").data == ["a", "b:0.3"]


def test_sequence_length_defaults_to_the_model_and_is_bounded_by_it():
    assert TrainConfig(preset="tiny").seq_len == 128
    assert TrainConfig(preset="base").seq_len == 512
    with pytest.raises(ConfigError, match="seq_len 1024 exceeds the model's max_positions 512"):
        TrainConfig(preset="base", seq_len=1024)


def test_model_config_applies_ablation_and_overrides_and_takes_the_data_vocabulary():
    config = TrainConfig(preset="tiny", ablation="no_adv_train", model={"head_layers": [1, 3]})
    model = config.model_config(vocab_size=777)
    assert (model.mixture, model.head_layers, model.vocab_size) == ("uniform", (1, 3), 777)
    with pytest.raises(ConfigError, match="unknown preset"):
        TrainConfig(preset="huge")


def test_bad_config_files_are_one_line_errors(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"sequence_length": 64}))
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['sequence_length'\]") as err:
        parse("--config", str(tmp_path / "c.json"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="file not found"):
        parse("--config", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="--max-steps must be at least 1"):
        parse("--max-steps", "0")


@pytest.mark.parametrize("name", ["base", "base_zero2", "base_zero3", "base_plus_plus", "base_plus_plus_zero2",
                                  "base_plus_plus_zero3", "cpu"])
def test_shipped_configs_follow_the_paper(name):
    config = load_ds_config(DS_CONFIG_DIR / f"{name}.json")
    optimizer = config["optimizer"]["params"]
    assert (optimizer["betas"], optimizer["eps"], optimizer["weight_decay"]) == ([0.9, 0.98], 1e-6, 0.01)
    assert config["scheduler"]["type"] == "WarmupDecayLR"
    # bf16 on GPUs; fp32 on CPUs, where bf16 matmuls without native support ran many times slower.
    assert config["gradient_clipping"] == 2.0 and config["bf16"]["enabled"] == (name != "cpu")
    if name != "cpu":
        paper = {"base": (5e-4, 125_000), "base_plus_plus": (2e-4, 1_950_000)}[name.removesuffix("_zero2")
                                                                                .removesuffix("_zero3")]
        assert (config["scheduler"]["params"]["warmup_max_lr"], scheduler_total_steps(config)) == paper
        assert config["scheduler"]["params"]["warmup_num_steps"] == 10_000
        assert config["train_batch_size"] == 2048
        assert config["zero_optimization"]["stage"] == int(name[-1]) if "zero" in name else 1


def test_gradient_accumulation_follows_the_world_size():
    config = {"train_batch_size": 2048, "train_micro_batch_size_per_gpu": 32}
    assert [gradient_accumulation(config, world, "f.json") for world in (1, 8, 64)] == [64, 8, 1]
    with pytest.raises(ConfigError) as err:
        gradient_accumulation(config, 48, "f.json")
    assert str(err.value) == ("--deepspeed_config f.json: train_batch_size 2048 is not divisible by "
                              "train_micro_batch_size_per_gpu 32 x 48 data-parallel ranks = 1536; pick a micro-batch "
                              "and rank count whose product divides 2048")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps 3 contradicts"):
        gradient_accumulation({**config, "gradient_accumulation_steps": 3}, 8, "f.json")


def test_derived_config_for_one_run(tmp_path):
    base = load_ds_config(DS_CONFIG_DIR / "base.json")
    config = derive_ds_config(base, "base.json", world_size=16, max_steps=500, fp32=True, run_dir=tmp_path,
                              load_universal=True)
    assert config["gradient_accumulation_steps"] == 4
    assert "bf16" not in config and base["bf16"]["enabled"]
    assert config["scheduler"]["params"]["total_num_steps"] == 500
    assert config["tensorboard"] == {"enabled": True, "output_path": str(tmp_path), "job_name": "tensorboard"}
    assert config["checkpoint"] == {"load_universal": True}


def test_derived_config_keeps_the_files_precision_unless_fp32(tmp_path):
    base = load_ds_config(DS_CONFIG_DIR / "base.json")
    config = derive_ds_config(base, "base.json", world_size=8, max_steps=10, fp32=False, run_dir=tmp_path,
                              load_universal=False)
    assert config["bf16"] == {"enabled": True} and precision(config) == "bf16"
    assert "checkpoint" not in config
    fp32 = derive_ds_config(base, "base.json", world_size=8, max_steps=10, fp32=True, run_dir=tmp_path,
                            load_universal=False)
    assert precision(fp32) == "fp32"
