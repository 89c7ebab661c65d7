"""The token-shard format: written by tasks/tokens/tokenize.py, read by model/loader.py.

No torch here, so data stages can name the files without importing the training stack.
"""

SPLITS = ("train", "val")
INDEX_FILE = "index.json"  # seq_len, dtype, vocab and special ids, per-split file lists
TOKENS_COLUMN = "tokens"  # fixed_size_list<uint16|uint32>[seq_len + 1] per sample
