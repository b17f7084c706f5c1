"""`python -m clowderd` runs the daemon, like `python -m clowderd.main`."""
import sys

from clowderd.main import main

sys.exit(main())
