"""``python -m sidecar.walkthrough``: the demo, as ``sidecar demo`` runs it."""

import sys

from .story import main

sys.exit(main())
