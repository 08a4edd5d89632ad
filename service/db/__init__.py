"""The database, the source of truth: SQLAlchemy models (models), engines and transactions (session), schema
migrations through Alembic's migrations/ (migrate).
Imports nothing else of the service; everything above may import it."""
