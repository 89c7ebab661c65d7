"""Plain torch: the one readable transformer, heads, losses, chat template, loaders, the training loop, export. No Prefect, no stages."""
