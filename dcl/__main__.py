"""Allow ``python -m dcl``, which the workflow uses to run the same interpreter as Snakemake."""

import sys

from dcl.cli import main

sys.exit(main())
