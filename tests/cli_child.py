"""How tests start the `onthefly` CLI in a child process that Ctrl-C can stop.

A shell starts background jobs, and so their children, with SIGINT ignored, and Python then never
raises KeyboardInterrupt: a test run started in the background would wait in vain for a child it
sent Ctrl-C. The child puts Python's own handler back before the CLI starts.
"""

from __future__ import annotations

import sys

CLI = [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
       "runpy.run_module('onthefly.cli', run_name='__main__')"]
