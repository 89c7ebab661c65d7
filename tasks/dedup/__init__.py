"""Remove duplicates: exact (normalised-text hash) and near (MinHash LSH in minhash + lsh_clusters, verified clusters)."""
