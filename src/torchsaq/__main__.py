"""``python -m torchsaq`` (and ``torchrun -m torchsaq``): the ``torchsaq`` command line."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
