"""What transport tests import by name (a conftest is not importable as a module when
several test folders each have one)."""

import re

LISTENING = re.compile(r"memnode: listening on (\S+)")
