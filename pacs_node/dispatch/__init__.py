"""Delivery of stored results: C-STORE, STOW-RS and FHIR handlers behind one Protocol, and the
outbox that retries them with backoff until delivered or dead-lettered."""
