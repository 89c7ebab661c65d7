"""Benchmarks: each runs ours and a named baseline on the same input and prints one JSON line (`lmf bench NAME`)."""
