from tvlang.cli import main
import sys
sys.exit(main())
