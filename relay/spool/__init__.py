"""The spool: every accepted part safe on disk, one store per owner worker."""
