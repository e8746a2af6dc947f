"""The AMOS model: generator with multi-layer MLM heads, adversarial mixture, RTD discriminator."""

from amos_ds.model.amos import AMOSModel, AMOSOutput, MLMHead
from amos_ds.model.encoder import Encoder
from amos_ds.model.relative_position import RelativePositionBias, relative_position_bucket

__all__ = ["AMOSModel", "AMOSOutput", "Encoder", "MLMHead", "RelativePositionBias", "relative_position_bucket"]
