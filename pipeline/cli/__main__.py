"""``python -m pipeline.cli``: the same as the ``vgg-pipeline`` console script."""

import sys

from . import main

sys.exit(main())
