"""A `tiny` AMOS model trained with plain PyTorch on real text lowers every loss."""

import itertools

import pytest
import torch

from amos_ds.config import get_preset
from amos_ds.data import DataConfig, ResumableSampler, build_loader, open_corpora
from amos_ds.data.preprocess import preprocess
from amos_ds.data.tokenizer import train_tokenizer
from amos_ds.model import AMOSModel

STEPS = 300
WINDOW = 20


@pytest.mark.slow  # 300 training steps: minutes on a loaded 2-core machine
def test_tiny_model_lowers_every_loss_on_real_text(shared_data, tmp_path):
    text = shared_data / "pretrain" / "austen.txt.gz"
    tokenizer = train_tokenizer([str(text)], vocab_size=1024, output=str(tmp_path / "tok"), lowercase=True)
    preprocess([str(text)], str(tmp_path / "tok"), str(tmp_path / "shards"), workers=1, progress=False)
    data_config = DataConfig(seq_len=64, num_workers=0, seed=5)
    dataset = open_corpora([str(tmp_path / "shards")], seq_len=64, seed=5)
    sampler = ResumableSampler(len(dataset), micro_batch_size=16, rank=0, world_size=1, seed=5)
    batches = build_loader(dataset, sampler, data_config)

    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, max_positions=64)
    model = AMOSModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    history = []
    for step, batch in enumerate(itertools.islice(batches, STEPS)):
        out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], seed=step)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        history.append(out.metrics)

    def mean(name, window):
        return sum(m[name].item() for m in window) / len(window)

    for name in ("loss", "mlm_loss", "rtd_loss", "mlm_loss_L1", "mlm_loss_L2", "mlm_loss_L3"):
        first, last = mean(name, history[:WINDOW]), mean(name, history[-WINDOW:])
        assert last < 0.95 * first, f"{name}: {first:.3f} -> {last:.3f}"
