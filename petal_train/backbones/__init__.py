"""Built-in backbones; importing this package registers them."""
from . import sface  # noqa: F401
