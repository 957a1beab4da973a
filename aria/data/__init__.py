"""Data: tokenizer, chat format and labels, image/video processing, datasets, packing."""
