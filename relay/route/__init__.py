"""Routing: which worker owns a recipient, and handing parts to owners."""
