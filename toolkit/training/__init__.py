"""Layer 1, training: config, data, model, the Accelerate loop, evaluation, checkpoints, run folder.

Imports `toolkit.core` only. `config` is torch-free (the command line builds its flags from it).
"""
