"""Type stubs of the sparseconv extension module."""

from os import PathLike
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, PathLike]

NUM_CLASSES: int

def read_points(path: _Path) -> npt.NDArray[np.float32]:
    """Points of a scan file (.bin, .pcd.bin, .ply, .npy) as float32 [N, C]."""

def voxelize(
    points: npt.NDArray[np.float32], voxel_size: float
) -> Tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """(coords int32 [M, 4] (batch, x, y, z), mean features float32 [M, C], voxel of each point int64 [N])."""

def conv(
    coords: npt.NDArray[np.int32],
    feats: npt.NDArray[np.float32],
    weight: npt.NDArray[np.float32],
    kernel_size: int,
    stride: int = 1,
    dilation: int = 1,
    transposed: bool = False,
    target_coords: Optional[npt.NDArray[np.int32]] = None,
    tensor_stride: int = 1,
    bias: Optional[Sequence[float]] = None,
    device: str = "cpu",
) -> Tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """One sparse convolution, weight [K, Cin, Cout] in TorchSparse's layout and offset order."""

def prune_model(
    model: _Path,
    out: _Path,
    ratio: float,
    granularity: str = "channel",
    criterion: str = "l1",
    round_to: int = 16,
) -> str:
    """Prune a model file (channels or kernel offsets), write the smaller model, return its widths."""

class Model:
    """A segmentation network (MinkUNet or SPVCNN) and the engine it runs on."""

    @staticmethod
    def load(path: _Path, device: str = "cpu", threads: Optional[int] = None, precision: str = "f32") -> "Model": ...
    @property
    def arch(self) -> str: ...
    @property
    def cr(self) -> float: ...
    @property
    def widths(self) -> str: ...
    def segment(self, points: npt.NDArray[np.float32], train_ids: bool = False) -> npt.NDArray[np.uint32]:
        """A label per point: SemanticKITTI raw ids, or training ids 1..19."""
    def logits(self, points: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Class scores per point, float32 [N, 19] (column j is training id j + 1)."""
