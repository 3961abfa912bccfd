"""Built-in backbones; importing this package registers them."""
from . import sface  # noqa: F401
from . import iresnet  # noqa: F401
from . import swin  # noqa: F401
