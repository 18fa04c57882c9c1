"""janus_train: train DeepSeek Janus / Janus-Pro style unified multimodal models."""

__version__ = "0.1.0"
