"""Non-finite losses: the optimizer step is skipped on every rank and counted; a run of them stops training.

The loop passes every micro-batch's loss through `NonFiniteGuard.guard()` before its backward. The guard keeps a
device-side flag (no host synchronisation); on the step's last micro-batch it all-reduces the flag (one small
collective per optimizer step) and multiplies that loss by NaN when any rank saw a NaN or infinite loss in this
step, by 1.0 otherwise (exact: the gradients do not change by a bit). NaN gradients make the global gradient norm
invalid, and DeepSpeed's optimizers (ZeRO 1-3, and the bf16 optimizer without ZeRO) then skip the update on every
rank: weights, optimizer state and learning-rate schedule stay as they were, `engine.was_step_applied()` is False
and `engine.skipped_steps` counts it. Multiplying by NaN also covers an infinite loss whose gradients are finite,
which DeepSpeed alone would apply.

`after_step()` reads the flag back only when DeepSpeed skipped the step (rare), and reports when `max_in_a_row`
steps in a row had a non-finite loss: the run then saves its state (the weights of the last applied step) and
stops. A step that DeepSpeed skipped for another reason (an fp16 loss-scale overflow with a finite loss) is
counted in `skipped_steps` but does not stop the run.
"""

from typing import Any

import torch
import torch.distributed as dist

from amos_ds.errors import ConfigError


class NonFiniteGuard:
    def __init__(self, engine: Any, ds_config: dict[str, Any], ds_path: object, max_in_a_row: int) -> None:
        if not hasattr(engine.optimizer, "overflow"):
            raise ConfigError(f"--deepspeed_config {ds_path}: this optimizer setup (ZeRO stage 0 without bf16/fp16) "
                              "cannot skip a step with a non-finite loss; use ZeRO stage 1, 2 or 3")
        if ds_config.get("bf16", {}).get("enabled") and ds_config["bf16"].get("check_grad_overflow") is False:
            raise ConfigError(f"--deepspeed_config {ds_path}: bf16.check_grad_overflow false would apply steps with "
                              "non-finite gradients; remove it")
        self.engine = engine
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self._flag = torch.zeros((), device=engine.device)

    def guard(self, loss: torch.Tensor, last_micro_batch: bool) -> torch.Tensor:
        """The loss to backpropagate: itself, or (on the last micro-batch of a poisoned step) NaN times it."""
        self._flag = torch.maximum(self._flag, (~torch.isfinite(loss.detach())).to(self._flag.dtype))
        if not last_micro_batch:
            return loss
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        return loss * torch.where(self._flag > 0, torch.nan, 1.0).to(loss.dtype)

    def after_step(self) -> bool:
        """Call after the step's last engine.step(); True when the run should save and stop."""
        if self.engine.was_step_applied():
            self.in_a_row = 0
        elif self._flag.item():  # read only when DeepSpeed skipped the step
            self.in_a_row += 1
        self._flag.zero_()
        return self.in_a_row >= self.max_in_a_row
