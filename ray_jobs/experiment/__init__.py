"""Experiments: a grid of ordinary jobs expanded from one spec, and the table their results make."""
