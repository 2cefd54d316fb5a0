"""kdad: Multiresolution Knowledge Distillation for Anomaly Detection on PaddlePaddle."""

__version__ = "0.1.0"
