"""docker-event-relay: Docker Engine events as CloudEvents, delivered with nothing lost."""

__version__ = "0.1.0"
