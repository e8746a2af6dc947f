"""amos_kernels: fused Triton kernels for amos-ds (installed from the kernels/ folder; imports nothing from amos_ds).

`mlm_and_sample_triton` is the fused vocabulary path that `amos_ds.ops.mlm_and_sample(impl="triton")` calls.
"""

from .vocab_path import KernelConfig, default_config, mlm_and_sample_triton

__all__ = ["KernelConfig", "default_config", "mlm_and_sample_triton"]
