"""Filter by quality: Gopher / C4 / FineWeb rules (rules, words) and a fastText quality classifier (quality)."""
