import sys

from frankenlab.tui.cli.main import main

sys.exit(main())
