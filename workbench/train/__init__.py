"""Training experts: LoRA, full fine-tunes and the multitask LoRA, saved into a pool."""

from .trainer import FullConfig, LoraConfigModel, TrainResult, train_expert

__all__ = ["FullConfig", "LoraConfigModel", "TrainResult", "train_expert"]
