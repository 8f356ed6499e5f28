"""AgentRegistrationLib: the engine of the AgentRegistration Slicer extension.

Krebs et al., "Robust non-rigid registration through agent-based action learning",
MICCAI 2017. The engine imports no Qt and no ``slicer.app``; it works on SimpleITK
images, numpy arrays and torch tensors. ``mrml`` is the only module that touches MRML.
"""

__version__ = "0.1.0"
