"""Conversion between our checkpoints and the Hugging Face Aria format."""
