"""The Aria model: vision encoder, projector, MoE decoder, generation, losses and counts."""

from aria.config import IGNORE_INDEX
from aria.model.aria import Aria, AriaOutput, build_model, merge_image_features
from aria.model.decoder import KVCache
from aria.model.generation import generate
from aria.model.loss import chunked_cross_entropy

__all__ = ["Aria", "AriaOutput", "IGNORE_INDEX", "KVCache", "build_model", "chunked_cross_entropy",
           "generate", "merge_image_features"]
