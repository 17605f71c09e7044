"""The distill stage: the policy trained against the scored pairs with the spec's loss (`ray_jobs.losses`)."""
