"""mmtx: multimodal transformer training on one shared backbone.

From Python:

    import mmtx
    cfg = mmtx.compose("vit_cifar", ["backbone=tiny"])   # the composed Hydra config
    model, datamodule = mmtx.build(cfg)                   # built, not trained
    model = mmtx.load("outputs/vit_cifar/.../checkpoints/last.ckpt")   # trained: predict(), generate()
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import mmtx` stays cheap
    if name == "compose":
        from mmtx.config.compose import compose

        return compose
    if name == "build":
        from mmtx.config.wiring import build

        return build
    if name in ("load", "Model"):
        from mmtx import checkpoints

        return getattr(checkpoints, name)
    raise AttributeError(name)


__all__ = ["compose", "build", "load", "Model", "__version__"]
