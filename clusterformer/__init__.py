"""ClusterFormer: clustering as a universal visual learner.

Subpackages import one way: ``ops`` <- ``models`` <- ``tasks`` <- ``engine`` <- ``inference``
(the Python API, :func:`load`) <- ``cli``; ``data`` depends only on ``ops``. Nothing heavy
happens at import time: ``clusterformer.load`` imports torch on first use.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clusterformer")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "load"]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 module attribute
    if name == "load":  # the Python API (clusterformer.inference.load), imported on first use
        from clusterformer.inference import load

        return load
    raise AttributeError(f"module 'clusterformer' has no attribute {name!r}")
