"""ZeroI2V end to end: the model with its head, the merge, ONNX export, the release's checkpoints."""
