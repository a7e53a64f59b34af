"""Running models: safe loading and atomic saving, the one onnxruntime session factory, input shapes
and feeds, intermediate tensors, verification, and what the CPU offers."""
