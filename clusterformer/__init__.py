"""ClusterFormer: clustering as a universal visual learner.

Subpackages import one way: ``ops`` <- ``models`` <- ``tasks`` <- ``engine`` <- ``cli``;
``data`` depends only on ``ops``. Nothing heavy happens at import time.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clusterformer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
