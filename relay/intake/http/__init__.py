"""The HTTP entry point: KumoMTA-compatible ``POST /api/inject/v1``."""
