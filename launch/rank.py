"""`python -m launch.rank`: the module every launcher starts once per rank."""

import sys

from launch.launchers import rank_main

if __name__ == "__main__":
    sys.exit(rank_main())
