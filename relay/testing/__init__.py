"""Test infrastructure shipped with the relay: the fake internet (fakenet)."""
