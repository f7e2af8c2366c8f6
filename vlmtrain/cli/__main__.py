"""``python -m vlmtrain.cli``: the ``vlmtrain`` command."""

import sys

from vlmtrain.cli import main

sys.exit(main())
