"""Layer 3, applications: verify, predict, the `toolkit run` pipeline, the report, the command line.

Imports every layer below; nothing imports it.
"""
