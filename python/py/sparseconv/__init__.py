"""sparseconv: point-cloud sparse convolution and LiDAR segmentation, from Python.

The engine is the Rust crate of the same name; this package calls it with numpy arrays in and
out and releases the GIL while it works. Errors are raised as ``ValueError`` (bad arguments or
file contents), ``FileNotFoundError``/``OSError`` (files) or ``RuntimeError`` (no GPU), with
the same one-line messages as the ``sparseconv`` command.

    import sparseconv
    points = sparseconv.read_points("data/semantickitti/sequences/00/velodyne/000000.bin")
    model = sparseconv.Model.load("data/models/minkunet_cr0.5.safetensors", threads=2)
    labels = model.segment(points)          # SemanticKITTI raw ids, one per point
"""

from ._sparseconv import NUM_CLASSES, Model, conv, prune_model, read_points, voxelize

__all__ = ["NUM_CLASSES", "Model", "conv", "prune_model", "read_points", "voxelize"]
