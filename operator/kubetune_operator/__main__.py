"""`python -m kubetune_operator`: run the operator (settings from the environment, see settings.py)."""

import sys

from kubetune_operator.runner import main

sys.exit(main())
