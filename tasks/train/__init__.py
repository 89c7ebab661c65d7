"""Training stages on DeepSpeed: pretraining, then post-training (SFT, reward model, DPO)."""
