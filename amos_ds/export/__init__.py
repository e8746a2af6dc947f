"""Exporting a pretrained AMOS encoder for Hugging Face `transformers` (`amos-ds export`)."""
