"""Making a trained model cheaper: structured pruning (prune.py), static and dynamic int8 and half
copies (quantize.py), ONNX export checked with ONNX Runtime (export.py), and knowledge distillation
(distill.py, used by the training loop). The `dlrun-compress` command is dlrun/tools/compress.py."""
