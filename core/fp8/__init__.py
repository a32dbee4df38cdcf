from core.fp8.training import *  # noqa: F401,F403
from core.fp8.training import __all__  # noqa: F401
