"""Checkpoints and exports back to models: `load` (also `mmtx.load`) and the `Model` it returns.

(The checkpoint file IO itself is still `mmtx.checkpoint`; the package layout issue moves it here.)"""

from mmtx.checkpoints.loader import Model, load, rebuild

__all__ = ["Model", "load", "rebuild"]
