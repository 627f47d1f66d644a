"""Training: built-in corpus, Ray Train stages, export to ONNX and a cloud bundle."""
