"""``python -m modules …`` — see ``modules.cli``."""
import sys

from modules.cli import main

sys.exit(main())
