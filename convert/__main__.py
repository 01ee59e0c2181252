"""`python -m convert ...`: see convert/command.py."""
import sys

from convert.command import main

sys.exit(main())
