import sys

from lors.cli import main

sys.exit(main())
