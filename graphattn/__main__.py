"""``python -m graphattn`` runs the command line."""

import sys

from graphattn.cli import main

sys.exit(main())
