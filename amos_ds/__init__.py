"""amos-ds: DeepSpeed-based pretraining of AMOS text encoders (Meng et al., ICLR 2022)."""

__version__ = "0.1.0"
