"""``python -m store_svc`` runs the command line."""

import sys

from store_svc.cli import main

sys.exit(main())
