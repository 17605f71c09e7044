"""The ensemble stage: K Bradley–Terry reward models fitted in parallel (Ray Tune trials of Ray Train runs)."""
