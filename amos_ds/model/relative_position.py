"""T5-style relative position bias, in the signed-bucket form of the authors' (COCO-LM lineage) model code.

A relative distance r = key - query maps to sign(r) * bucket(|r|): distances below half of the half-range are
their own bucket ("exact"), larger ones share logarithmically wider buckets up to `max_distance`. One
`Embedding(num_buckets, num_heads)` table per encoder holds a learned score per bucket and head, added to every
layer's attention scores. Its rows are in the authors' order, bucket minus its minimum (`rp_bucket -
rp_bucket.min()`, row 0 = the farthest keys to the left), so that their released weights map row for row; the last
row is never used.
"""

import math

import torch
from torch import nn


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Signed bucket of each relative distance, in [-(num_buckets // 2 - 1), num_buckets // 2 - 1].

    Follows the authors' code: with half = num_buckets // 2 and max_exact = half // 2, |r| < max_exact is exact;
    above, ceil(log(|r| / max_exact) / log((max_distance - 1) / max_exact) * (half - 1 - max_exact)) is added to
    max_exact, capped at half - 1.
    """
    sign = torch.sign(relative_position)
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative_position.abs()
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log((max_distance - 1) / max_exact)
    large = max_exact + torch.ceil(log_ratio * (half - 1 - max_exact)).long()
    large = large.clamp(max=half - 1)
    return torch.where(distance < max_exact, distance, large) * sign


class RelativePositionBias(nn.Module):
    """Learned per-head score for each relative-position bucket, shared by all layers of one encoder."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.table = nn.Embedding(num_buckets, num_heads)

    def bucket_index(self, seq_len: int) -> torch.Tensor:
        """[seq_len, seq_len] row of `table` for each (query, key) pair: what FlexAttention's score_mod reads."""
        positions = torch.arange(seq_len, device=self.table.weight.device)
        relative = positions[None, :] - positions[:, None]
        # Rows in the authors' order: bucket minus its minimum. The authors subtract the minimum over their 512 x 512
        # positions, which reaches the cap -(half - 1) for every max_distance up to 512; our presets all reach it too.
        return relative_position_bucket(relative, self.num_buckets, self.max_distance) + self.num_buckets // 2 - 1

    def forward(self, seq_len: int) -> torch.Tensor:
        """Bias [1, num_heads, seq_len, seq_len] to add to attention scores (query rows, key columns).

        Indexing the transposed table gives the bias contiguous, key positions last: PyTorch's fused CUDA attention
        kernels take an additive mask only when its last dimension has stride 1 (others fall back to the math path).
        """
        return self.table.weight.t()[:, self.bucket_index(seq_len)].unsqueeze(0)
