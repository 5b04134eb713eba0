"""``python -m relay.cli`` is relayctl."""

import sys

from relay.cli import main

sys.exit(main())
