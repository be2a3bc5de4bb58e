"""mpcl.nn: the model core that training, export and the torch backend share.

Network definitions (``unet``, the training-only ``projection`` and ``multiscale_projection`` heads),
the network spec of checkpoint metadata and model.json (``spec``), batch-norm folding (``folding``) and
the checkpoint format (``checkpoint``). torch is imported at module level here and above
(``mpcl.training``, ``mpcl.export``); ``import mpcl`` imports neither this package nor torch, and the
runtime's torch backend imports this package only when it loads a checkpoint.

Layers, lowest first (``tests/test_layers.py`` enforces them): the runtime (``mpcl`` outside the
subpackages below), ``mpcl.nn``, ``mpcl.training``, ``mpcl.export``, and the ``mpcl-train``/``mpcl-eval``
commands (``mpcl.training.cli``), which train and then package. A module imports only from its own layer
or lower ones.
"""
