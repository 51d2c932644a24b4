"""Layer 2, artifacts: the format registry, export, and one `Backend` interface over every runtime.

Imports `toolkit.core` and `toolkit.training`. `formats`, `metadata`, `manifest` and `backends`
import no torch at module level: an ONNX model is served with numpy and ONNX Runtime alone.
"""
