"""Parallelism: the device mesh, tensor/expert/pipeline/data parallel plans and distributed checkpoints."""
