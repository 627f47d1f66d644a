"""Code shared by the edge and the cloud.

Two halves: numpy/stdlib-only modules the edge imports (``constants``,
``wire``, ``synth``, ``bundle``) and torch model files, one model per file.
Nothing here imports torch at package import time.
"""
