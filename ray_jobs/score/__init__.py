"""The score stage: build the distillation pairs and precompute π_ref's log-probs and every member's rewards."""
