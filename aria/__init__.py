"""Aria: a from-scratch PyTorch reproduction of the Aria multimodal mixture-of-experts model."""
