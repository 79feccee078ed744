"""`python -m kubetune_operator`: run the operator (settings from the environment, see settings.py)."""

import sys

# kopf imports kubernetes_asyncio (shipped inside the kubernetes wheel) only to recognise its model objects,
# which the operator never hands to kopf; not loading its ~1,000 modules saves ~30 MiB of resident memory.
sys.modules.setdefault("kubernetes_asyncio", None)  # type: ignore[arg-type]  # None blocks the import (documented)

from kubetune_operator.runner import main  # noqa: E402 - after the sys.modules entry above, on purpose

sys.exit(main())
