"""The catalog: every piece of the node's state, in SQLAlchemy rows (SQLite or PostgreSQL)."""
