"""Winning quality back after pruning: closed-form compensation and LoRA recovery."""
