"""``python -m modules …`` — see ``modules.cli``."""
import os
import sys

# TensorFlow's C++ start-up chatter says nothing a user can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from modules.cli import main  # noqa: E402

sys.exit(main())
