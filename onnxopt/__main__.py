"""`python -m onnxopt` is the `onnxopt` command."""

import sys

from .launch import main

sys.exit(main())
