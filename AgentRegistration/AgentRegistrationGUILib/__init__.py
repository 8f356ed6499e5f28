"""Slicer-side code both modules share (Qt dialogs, the worker's Python, the models folder); the engine is
``AgentRegistrationLib``, which imports no Qt."""
