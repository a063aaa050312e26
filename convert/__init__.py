"""Converters: Hugging Face checkpoints and llama.cpp GGUFs into lvgg experts files."""
