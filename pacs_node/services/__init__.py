"""The queries and commands every door calls: the CLI now, the web API and Celery next.

Each function takes the collaborators it needs (the :class:`~pacs_node.catalog.db.Catalog`,
the :class:`~pacs_node.config.Settings`) and opens its own transaction; each command takes an
:class:`~pacs_node.actor.Actor` and records it in the events it appends. Doors format and
print; they never query the catalog themselves.
"""
