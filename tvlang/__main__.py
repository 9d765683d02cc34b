import sys

from tvlang.cli import main

sys.exit(main())
