"""Exporting pruned models to other runtimes: GGUF for llama.cpp."""
