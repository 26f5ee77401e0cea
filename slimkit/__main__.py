import sys

from slimkit.cli import main

sys.exit(main())
