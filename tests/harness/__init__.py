"""Test harness: real Docker Engines and brokers started as private processes.

Imported as `tests.harness` (tests/ is a package, so pytest puts the repository root on sys.path
when it loads tests/conftest.py). Nothing in the product code imports it.
"""

from .brokers import BrokerProcess, Mosquitto, MotoS3, Tansu, free_port
from .engine import (
    EnginePool,
    EngineSpec,
    PrivateEngine,
    available_engines,
    known_engines,
    require_engine,
)
from .proxy import DelayProxy
from .wait import async_wait_for, wait_for

__all__ = [
    "BrokerProcess",
    "DelayProxy",
    "EnginePool",
    "EngineSpec",
    "Mosquitto",
    "MotoS3",
    "PrivateEngine",
    "Tansu",
    "async_wait_for",
    "available_engines",
    "free_port",
    "known_engines",
    "require_engine",
    "wait_for",
]
