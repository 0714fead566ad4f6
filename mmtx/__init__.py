"""mmtx: multimodal transformer training on one shared backbone.

From Python:

    from mmtx import compose, build
    cfg = compose("vit_cifar", ["backbone=tiny"])   # the composed Hydra config
    model, datamodule = build(cfg)                   # built, not trained
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import mmtx` stays cheap
    if name == "compose":
        from mmtx.config import compose

        return compose
    if name == "build":
        from mmtx.wiring import build

        return build
    raise AttributeError(name)


__all__ = ["compose", "build", "__version__"]
