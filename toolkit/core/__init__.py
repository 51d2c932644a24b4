"""The foundation every layer shares: user-facing errors, the image format, file helpers.

Nothing here imports torch, so `toolkit predict model.onnx` stays a numpy + ONNX Runtime program.
"""
