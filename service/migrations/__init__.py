"""Alembic migrations, run programmatically by `service.store.migrate` (no alembic.ini)."""
