"""``python -m AgentRegistrationLib.cli``: how the Slicer modules start a worker."""

import numpy as np

from AgentRegistrationLib.cli import run

np.set_printoptions(precision=4)
run()
