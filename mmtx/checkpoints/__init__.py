"""Checkpoints and exports: their file IO (`io`: atomic writes, safe loading, finding a run to resume), exported
folders (`exported`), and back to models: `load` (also `mmtx.load`) and the `Model` it returns (`loader`)."""

__all__ = ["Model", "load", "rebuild"]


def __getattr__(name):  # lazy: the file IO below is imported by training, which `loader` imports
    if name in __all__:
        from mmtx.checkpoints import loader

        return getattr(loader, name)
    raise AttributeError(name)
