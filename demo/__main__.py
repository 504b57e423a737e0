"""`python -m demo`: serve the demo page on http://127.0.0.1:8090/ (see demo/server.py)."""

import sys

from demo.server import main

sys.exit(main())
