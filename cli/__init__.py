"""The ``cf`` command line (installed as ``clusterformer.cli``)."""
