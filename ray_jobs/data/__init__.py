"""Preference data: sources, formats, validation, splits, the induced length bias and the builtin:reviews task."""

from ray_jobs.data.errors import DatasetError
from ray_jobs.data.stage import load_preference_data, load_split, ray_split

__all__ = ["DatasetError", "load_preference_data", "load_split", "ray_split"]
