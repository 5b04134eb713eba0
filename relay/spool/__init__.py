"""The spool: every accepted part safe on disk, one store per owner worker.

schema.py declares the tables and migrations; store.py writes (the relay's
only writer); read.py is the read API for relayctl, perf/ and the tests;
bulk.py builds large synthetic spools offline (perf/); testing.py makes
the hand-written rows and wrong files tests need.  SQL against the spool's
tables lives here and nowhere else (tests/unit/test_spool_sql.py)."""
