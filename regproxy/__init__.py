"""regproxy: a node-local OCI registry cache."""

__version__ = "0.1.0"
