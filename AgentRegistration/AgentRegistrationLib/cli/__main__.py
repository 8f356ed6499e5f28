"""``python -m AgentRegistrationLib.cli``: how the Slicer modules start a worker."""

import sys

import numpy as np

from AgentRegistrationLib.cli import main

np.set_printoptions(precision=4)
sys.exit(main())
