"""``python -m flowdit.cli`` (and ``torchrun -m flowdit.cli``): the ``flowdit`` command."""

import sys

from flowdit.cli.main import main

sys.exit(main())
