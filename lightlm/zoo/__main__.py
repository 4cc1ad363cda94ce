"""``python -m lightlm.zoo {warm,requirements,info,clean}``: the command line of :mod:`lightlm.artefacts`."""

import sys

from lightlm.artefacts import main

sys.exit(main())
