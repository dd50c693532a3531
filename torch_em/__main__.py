"""``python -m torch_em``: the command line (:mod:`torch_em.cli`)."""
import sys

from .cli import main

sys.exit(main())
