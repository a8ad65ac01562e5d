"""Models: nn.Modules that hold parameters and call ``clusterformer.ops``."""
