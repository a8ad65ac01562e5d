"""Datasets, WebDataset shards and loaders (installed as ``clusterformer.data``).

Depends on nothing in ``clusterformer`` but ``ops``.
"""
