"""The model's tensor inputs from one loader batch, for training and evaluation alike."""

import torch


def model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor | None]:
    """Copies from pinned memory do not wait (non_blocking), and the batch's host-side facts (masked positions,
    whether it has padding) spare the model any wait for the device."""
    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)

    return {"input_ids": to_device(batch["input_ids"]), "labels": to_device(batch["labels"]),
            "attention_mask": to_device(batch["attention_mask"]) if batch["has_padding"] else None,
            "masked_positions": to_device(batch["masked_positions"])}
