"""Feeds: committed delivery events, read from the spool through a cursor
(outbox) and published elsewhere; never on the delivery path."""
