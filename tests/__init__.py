"""regproxy's tests.

Imported before any test module or conftest: where PYTHONDONTWRITEBYTECODE is set, the test run
still keeps compiled modules (and pytest's assertion-rewritten test modules) between runs, under
a cache directory of its own outside the tree. Compiling and rewriting all of them again was
4-5 s of every fast-tier run.
"""

import os
import sys
import tempfile

if sys.dont_write_bytecode and not sys.pycache_prefix:
    sys.dont_write_bytecode = False
    sys.pycache_prefix = os.path.join(tempfile.gettempdir(), f"regproxy-pycache-{os.getuid()}")
