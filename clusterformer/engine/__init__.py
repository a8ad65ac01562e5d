"""Training and evaluation loops, distributed setup, checkpoints, logging.

Submodules are imported on use (``from clusterformer.engine.loop import train``) so that
importing the package stays cheap.
"""
