"""Model assembly, freezing and the training forward on HF transformers' Janus classes."""

from janus_train.model.build import PartitionedLoad, build_model, get_processor
from janus_train.model.config import ModelConfig
from janus_train.model.forward import JanusTrainModel
from janus_train.model.freeze import apply_freeze, set_train_mode, write_trainable_report
from janus_train.model.groups import GROUPS
from janus_train.model.tokenizer import SpecialTokens, resolve_special_tokens, train_tiny_tokenizer

__all__ = [
    "GROUPS",
    "JanusTrainModel",
    "ModelConfig",
    "PartitionedLoad",
    "SpecialTokens",
    "apply_freeze",
    "build_model",
    "get_processor",
    "resolve_special_tokens",
    "set_train_mode",
    "train_tiny_tokenizer",
    "write_trainable_report",
]
