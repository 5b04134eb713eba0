"""Stats: the shared-memory ring every worker publishes its figures to."""
