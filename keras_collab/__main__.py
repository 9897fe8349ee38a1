"""`python -m keras_collab` runs the `keras-collab` command line."""

import sys

from keras_collab.cli import main

sys.exit(main())
