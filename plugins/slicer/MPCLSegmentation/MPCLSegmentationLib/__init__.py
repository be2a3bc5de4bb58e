"""Logic of the MPCL Segmentation module that needs neither the Slicer application nor Qt.

``geometry`` and ``process`` are pure Python/numpy; ``nodes`` and ``logic`` need vtk and an MRML scene
(Slicer's, or the ``slicer-core`` wheel's in tests); ``mpcl`` itself is imported only when a run starts,
so the module can load, and offer to install the runtime, where it is missing.
"""
