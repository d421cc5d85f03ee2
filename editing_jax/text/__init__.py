"""Offline text side: a word-level tokenizer and a small trainable encoder (interface for real encoders later)."""
