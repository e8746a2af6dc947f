"""`amos-ds launch --dry-run`: the plan's numbers for a known config, the command, and .deepspeed_env."""

import glob
import json
import os

import pytest
import torch

from amos_ds import pretrain
from amos_ds.cli import main
from amos_ds.model import AMOSModel
from amos_ds.train import launch
from amos_ds.train.hostfile import Host
from amos_ds.train.train_config import TrainConfig


def trainer_parameters(config: TrainConfig) -> int:
    """The parameter count of the model pretrain.py's train() builds for this config: its data, then its model."""
    model_config = config.model_config(pretrain.open_data(config).vocab_size)
    with torch.device("meta"):
        return sum(p.numel() for p in AMOSModel(model_config).parameters())


def test_plan_for_base_on_two_a100_nodes(tmp_path, corpus):
    measured = tmp_path / "measured"
    measured.mkdir()
    (measured / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "tokens_per_s": 1000.0, "world_size": 2}) + "\n" for step in (1, 2)))
    config = TrainConfig(preset="base", deepspeed_config="ds_configs/base.json", run_dir=str(tmp_path / "run"),
                         data=glob.glob(f"{corpus}/builtin-*"))
    plan = launch.make_plan("h", [Host("a", 8), Host("b", 8)], config, throughput_from=measured)
    parameters = trainer_parameters(config)
    assert (plan.nodes, plan.gpus, plan.micro_batch, plan.accumulation) == (2, 16, 32, 4)
    assert (plan.global_batch, plan.seq_len, plan.tokens_per_step) == (2048, 512, 1_048_576)
    assert (plan.total_steps, plan.done_steps, plan.zero_stage, plan.precision) == (125_000, 0, 1, "bf16")
    assert plan.parameters == parameters
    # ZeRO-1, bf16: 2 (weights) + 2 (grads) bytes, plus 12 bytes of optimizer state split over 16 GPUs.
    assert plan.state_gib == pytest.approx(parameters * (4 + 12 / 16) / 2**30)
    # 8 generator + 12 discriminator layers of 32 x 512 x 768 x (34 + 5 x 12 x 512 / 768) bytes.
    assert plan.activation_gib == pytest.approx(20 * 32 * 512 * 768 * 74 / 2**30)
    # 1000 tokens/s on 2 ranks = 500 per GPU, x 16 GPUs = 8000; 125,000 steps of 1,048,576 tokens.
    assert plan.measured_tokens_per_s == 8000
    assert plan.eta_s == pytest.approx(125_000 * 1_048_576 / 8000)
    text = launch.format_plan(plan)
    assert "2048 sequences = micro-batch 32 x accumulation 4 x 16 GPU(s)" in text
    assert "A100-40GB fits, A100-80GB fits" in text
    assert "ETA 189d 15:06 for 125,000 steps" in text


def test_the_plan_counts_the_model_the_trainer_builds_on_the_built_in_corpus(tmp_path, corpus):
    """The README's dry run: without --data the built-in corpus's tokenizer (1024 pieces here) sets the vocabulary,
    not the preset (8192 for small)."""
    config = TrainConfig(preset="small", builtin_cache=str(corpus), builtin_vocab_size=1024,
                         run_dir=str(tmp_path / "run"))
    plan = launch.make_plan("h", [Host("localhost", 2)], config, throughput_from=None)
    assert plan.parameters == trainer_parameters(config)
    with torch.device("meta"):
        assert plan.parameters != sum(p.numel() for p in AMOSModel(config.model_config()).parameters())


def test_dry_run_prints_plan_and_command_without_starting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    run_dir = tmp_path / "run"
    code = main(["launch", "--hostfile", "hostfiles/localhost", "--no-ssh", "--dry-run", "--env", "NCCL_DEBUG=INFO",
                 "--", "--preset", "tiny", "--max-steps", "10", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0 and not run_dir.exists()
    assert "batch        32 sequences = micro-batch 16 x accumulation 1 x 2 GPU(s)" in out  # ds_configs/cpu.json
    assert "steps        10 (0 done)" in out
    assert "NCCL_DEBUG=INFO NCCL_SOCKET_IFNAME=eth0 TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in out
    assert (f"command      deepspeed --hostfile hostfiles/localhost --no_ssh --node_rank 0 --master_addr 127.0.0.1 "
            f"{launch.PRETRAIN} --preset tiny --max-steps 10 --run-dir {run_dir}") in out


def test_launch_writes_deepspeed_env_and_execs_openmpi(tmp_path, capsys, monkeypatch):
    started = {}
    monkeypatch.setattr(os, "execvpe", lambda file, command, env: started.update(command=command, env=env))
    run_dir = tmp_path / "run"
    main(["launch", "--hostfile", "hostfiles/localhost", "--no-ssh", "--launcher", "openmpi", "--master-port", "29999",
          "--", "--preset", "tiny", "--max-steps", "10", "--run-dir", str(run_dir)])
    command = started["command"]
    assert command[:8] == ["deepspeed", "--hostfile", "hostfiles/localhost", "--launcher", "openmpi", "--force_multi",
                           "--no_ssh_check", "--launcher_args"]
    assert "--oversubscribe --mca btl_tcp_if_include lo" in command[8]
    env_file = run_dir / ".deepspeed_env"
    assert started["env"]["DS_ENV_FILE"] == str(env_file.resolve())
    lines = env_file.read_text().splitlines()
    assert "MASTER_ADDR=127.0.0.1" in lines and "MASTER_PORT=29999" in lines


def test_batch_that_does_not_divide_is_one_line(tmp_path, capsys):
    (tmp_path / "h").write_text("a slots=8\nb slots=8\nc slots=8\n")
    assert main(["launch", "--hostfile", str(tmp_path / "h"), "--dry-run", "--",
                 "--deepspeed_config", "ds_configs/base.json", "--preset", "base"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_batch_size 2048 is not divisible by" in err and "x 24 data-parallel" in err
