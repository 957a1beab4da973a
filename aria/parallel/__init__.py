"""Distributed setup: process groups, the DeepSpeed engine, expert parallelism."""
