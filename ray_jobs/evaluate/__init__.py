"""The evaluate stage: policy vs π_ref on held-out prompts (oracle win rate, reward, KL, lengths, plots)."""
