"""kdviewer: a desktop chest X-ray / CT viewer whose classifier is a distilled student network.

Decision support only: never a diagnosis. Rooms (see docs/ARCHITECTURE.md):
``imaging`` (files -> pixels), ``models`` (bundles + runtimes), ``inference`` (predict, compare,
saliency, OOD), ``batch`` (folder classification), ``cli`` and ``gui`` (the only Qt room).
"""

__version__ = "0.1.0"
