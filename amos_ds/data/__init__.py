"""Data pipeline: raw text -> tokenizer -> shards -> packed, blended, masked, resumable batches.

The trainer's interface is re-exported here lazily, so that preprocessing (and its forked workers) never imports
torch.
"""

_LOADER_NAMES = ("DataConfig", "PackedDataset", "ResumableSampler", "build_loader", "open_corpora")


def __getattr__(name: str):
    if name in _LOADER_NAMES:
        from amos_ds.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module 'amos_ds.data' has no attribute {name!r}")


__all__ = list(_LOADER_NAMES)
