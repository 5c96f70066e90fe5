import sys

from astrolom.cli import main

sys.exit(main())
