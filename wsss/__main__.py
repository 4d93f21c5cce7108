import sys

from wsss.cli import main

sys.exit(main())
