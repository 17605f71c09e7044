"""Alembic environment: the caller (service.store.migrate) hands over an open connection."""

from alembic import context

from service.store import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
