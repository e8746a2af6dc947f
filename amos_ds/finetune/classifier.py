"""The paper's sentence-classification head (Table 6, as in BERT/RoBERTa) on the encoder's [CLS] vector."""

import torch
from torch import nn

from amos_ds.finetune.pretrained import TextEncoder


class ClassificationHead(nn.Sequential):
    """dropout -> dense -> tanh -> dropout -> out: [B, H] -> logits [B, num_labels]."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float, init_std: float = 0.02) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.Tanh(), nn.Dropout(dropout),
                         nn.Linear(hidden_size, num_labels))
        for layer in (self[1], self[4]):  # BERT initialisation, as the encoder's
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)


class SentenceClassifier(nn.Module):
    def __init__(self, encoder: TextEncoder, num_labels: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ClassificationHead(encoder.config.hidden_size, num_labels, dropout, encoder.config.init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] starting with [CLS] -> logits [B, num_labels]."""
        return self.head(self.encoder(input_ids, attention_mask)[:, 0])
