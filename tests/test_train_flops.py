"""The FLOP count of one AMOS step, against a hand calculation for the tiny preset."""

import os

import pytest
import torch

from amos_ds.config import get_preset
from amos_ds.train.flops import PEAK_TFLOPS, device_peak_tflops, forward_flops, step_flops


def test_tiny_step_flops_match_a_hand_calculation():
    # tiny: V 1024, H 64, 4 heads, FFN 128, 3 generator layers with heads at 1/2/3, 2 discriminator layers.
    # T = 64 tokens, M = 0.15 x 64 = 9.6 masked positions, K = 3 heads.
    layer = 8 * 64 * 64**2 + 4 * 64 * 64 * 128 + 4 * 64**2 * 64  # 5,242,880
    generator = 3 * layer  # 15,728,640
    heads = 3 * (2 * 9.6 * 64**2 + 2 * 9.6 * 64 * 1024)  # 4,010,803.2
    scorer = 2 * 9.6 * 64 * 3  # 3,686.4
    mixing = 2 * 3 * 9.6 * 1024  # 58,982.4
    discriminator = 2 * layer + 2 * 64 * 64  # 10,493,952
    # Backward only: the sampled embeddings' straight-through gradient, grad_sampled [M, H] @ E^T [H, V].
    straight_through = 2 * 9.6 * 64 * 1024  # 1,258,291.2
    per_sequence = 3 * (generator + heads + scorer + discriminator) + 2 * mixing + straight_through  # 92,087,500.8
    config = get_preset("tiny")
    assert forward_flops(config, 64, 0.15) == pytest.approx(
        {"generator": generator, "mlm_heads": heads, "mixture_scorer": scorer, "mixing": mixing,
         "discriminator": discriminator})
    assert step_flops(config, 64, 0.15, num_sequences=32) == pytest.approx(32 * 92_087_500.8)
    assert per_sequence == pytest.approx(92_087_500.8)


def test_ablations_change_the_count_where_they_change_the_model():
    tiny = get_preset("tiny")
    assert forward_flops(tiny.replace(mixture="uniform"), 64, 0.15)["mixture_scorer"] == 0
    separate = forward_flops(tiny.replace(separate_generators=True), 64, 0.15)["generator"]
    assert separate == 2 * forward_flops(tiny, 64, 0.15)["generator"]  # 1 + 2 + 3 layers instead of 3


def test_peak_of_a_cpu_rank_counts_its_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("OMPI_COMM_WORLD_LOCAL_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "4")  # four ranks on 8 cores: 2 each, though each runs 4 threads
    assert device_peak_tflops(torch.device("cpu"), "bf16") == PEAK_TFLOPS["cpu_core"]["bf16"] * 2
    monkeypatch.setenv("LOCAL_SIZE", "1")
    assert device_peak_tflops(torch.device("cpu"), "fp32") == PEAK_TFLOPS["cpu_core"]["fp32"] * 4
