"""The hyperparameter search of the paper's Table 6: every learning rate x batch size, each trained with the same
seeds; the setting with the best median dev score wins, and its median dev and test scores are the result.

The default grid depends on the encoder's width. From BERT-base's width up (the base and base++ presets), Table 6's
GLUE grid: lr {1e-5, 2e-5, 3e-5, 4e-5, 5e-5} x batch {16, 32}, 3 epochs (Table 6 also searches epochs {2, 3, 5, 10}
and warm-up {6%, 10%}: give --epochs and --warmup per invocation). Narrower encoders (the tiny and small presets)
barely move at those rates (issue 21: tiny at lr 2e-5 for 3 epochs stayed at the constant-prediction loss on a
444-example five-class task, and learned it at lr 1e-3 for 10 epochs). Their grid is lr {1e-4, 3e-4, 1e-3} x
batch {16, 32}, 10 epochs.
"""

import statistics
from dataclasses import dataclass

from amos_ds.config import ModelConfig

BASE_WIDTH = 768  # BERT-base's hidden size: from here up the paper's grid applies


@dataclass(frozen=True)
class Grid:
    lr: tuple[float, ...]
    batch_size: tuple[int, ...]
    epochs: int


PAPER_GRID = Grid(lr=(1e-5, 2e-5, 3e-5, 4e-5, 5e-5), batch_size=(16, 32), epochs=3)
SMALL_MODEL_GRID = Grid(lr=(1e-4, 3e-4, 1e-3), batch_size=(16, 32), epochs=10)


def default_grid(model: ModelConfig) -> Grid:
    """Table 6's grid for encoders of BERT-base width and wider, the small-model grid for narrower ones."""
    return PAPER_GRID if model.hidden_size >= BASE_WIDTH else SMALL_MODEL_GRID


def median_scores(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Each dev and test metric's median over the runs (of one setting), every metric on its own."""
    return {split: {name: statistics.median(run[split][name] for run in runs) for name in runs[0][split]}
            for split in ("dev", "test")}


def best_setting(settings: list[dict], metric: str) -> dict:
    """The setting whose median dev `metric` is highest; the first in grid order among equal ones."""
    return max(settings, key=lambda setting: setting["median"]["dev"][metric])
