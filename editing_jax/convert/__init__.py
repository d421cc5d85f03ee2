"""Converters from local Hugging Face-format safetensors checkpoints to Flax parameter trees."""
