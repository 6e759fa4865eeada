"""Data: the embedded corpus, other corpora, tokenizer, packing and synthetic tasks."""
