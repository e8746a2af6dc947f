"""The files `amos-ds export` writes beside the weights: standalone code that `transformers` loads with
`trust_remote_code=True`. They import torch, sentencepiece and transformers only, never amos_ds, so that a user of
the exported model needs nothing of amos-ds."""
