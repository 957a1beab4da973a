"""Data: tokenizer, chat format and labels, image/video processing, dataset formats (Aria and
LLaVA records; JSONL, JSON lists, Hugging Face datasets, webdataset shards), streams, packing."""
