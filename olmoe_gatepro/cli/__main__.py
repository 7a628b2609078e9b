"""``python -m olmoe_gatepro.cli``: the same as the ``olmoe-gatepro`` command."""

import sys

from olmoe_gatepro.cli import main

sys.exit(main())
