"""``python -m maskvlm ...`` (and ``torchrun ... -m maskvlm pretrain ...``): the same as the ``maskvlm`` command."""

import sys

from .cli import main

sys.exit(main())
