"""Fine-tuning the encoder AMOS pretraining leaves behind (discriminator + token embedding) on sentence classification.

The proof that pretraining worked: the same classifier, trained the same way, from a checkpoint and from random init.
"""
