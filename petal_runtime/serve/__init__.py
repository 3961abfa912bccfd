"""petal-serve: many sources in one process, one batched inference worker, events as they happen.

    from petal_runtime.serve import ServeConfig, Service
    with Service(ServeConfig.load("serve.toml")) as service:
        service.start()
        service.wait()
"""
from .config import EXAMPLE_CONFIG, ServeConfig
from .service import EVENT_TYPES, Service

__all__ = ["EXAMPLE_CONFIG", "EVENT_TYPES", "ServeConfig", "Service"]
