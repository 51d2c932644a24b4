"""Distributed training (Hugging Face Accelerate), export and verified inference for the
PyTorch CIFAR-10 tutorial network."""

__version__ = "0.1.0"
