"""Operator verbs with one implementation and two transports: relayctl
(over the control socket and the spools) and /api/admin/... (HTTP)."""
