"""Distributed training (Hugging Face Accelerate), export and verified inference for 32×32 image
classifiers: the PyTorch CIFAR-10 tutorial network, ResNet-18, airbench's speed net, or your own.

Four sub-packages, each importing only from those before it (tests/test_architecture.py checks):

    core       errors, the image format (size, normalization, decoding), file helpers; no torch
    training   config, data, the model registry, the Accelerate loop, evaluation, checkpoints, the run folder
    artifacts  the format registry, export, one `Backend` interface over every runtime
    apps       verify, predict, the `toolkit run` pipeline, the report, the command line

Importing `toolkit` imports none of them.
"""

__version__ = "0.1.0"
