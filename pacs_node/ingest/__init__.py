"""Receiving instances: the Storage SCP, the spool, and the path into the catalog."""
