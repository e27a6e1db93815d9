import sys

from demandstream.stream.cli import main

sys.exit(main())
