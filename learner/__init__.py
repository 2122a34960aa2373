"""Headwater's incremental learner: batch codec, models, trainer, model store, service."""

from learner.batch import TrainBatch, decode_batch, encode_batch

__all__ = ["TrainBatch", "decode_batch", "encode_batch"]
