"""``python -m clusterformer.cli`` (and ``torchrun ... -m clusterformer.cli``)."""

from clusterformer.cli.app import main

if __name__ == "__main__":
    main()
