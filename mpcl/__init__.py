"""MPCL runtime: reading images, preprocessing shared with training, and (later) the Segmenter.

This package must import with numpy, SimpleITK, nibabel, onnxruntime and click only: no torch here.
"""

__version__ = "0.1.0"

from mpcl.errors import ConfigError, InputError, MPCLError

__all__ = ["__version__", "ConfigError", "InputError", "MPCLError"]
