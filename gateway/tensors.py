"""Tensor data types, tensor signatures and the checks that turn wire bytes into arrays.

The domain represents a tensor as a numpy array; the datatype names are the Open Inference
Protocol's (`FP32`, `INT64`, ...), which the gateway's own API mirrors as an enum.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import InvalidInput


class DataType(enum.Enum):
    """Element type of a tensor, named as in the Open Inference Protocol."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"

    @property
    def numpy(self) -> np.dtype[np.generic]:
        """The little-endian numpy dtype of this datatype."""
        return _NUMPY[self]

    @classmethod
    def parse(cls, name: str, *, what: str) -> DataType:
        """The datatype named `name`; `what` names the tensor in the error when unknown."""
        try:
            return cls(name)
        except ValueError:
            valid = ", ".join(d.value for d in cls)
            raise InvalidInput(f"{what} has unknown datatype {name!r}; valid datatypes: {valid}") from None

    @classmethod
    def of(cls, dtype: np.dtype[np.generic]) -> DataType:
        """The datatype of a numpy dtype (any byte order)."""
        try:
            return _BY_KIND[(dtype.kind, dtype.itemsize)]
        except KeyError:
            raise InvalidInput(f"numpy dtype {dtype} has no tensor datatype") from None


_NUMPY: dict[DataType, np.dtype[np.generic]] = {
    DataType.BOOL: np.dtype("?"),
    DataType.UINT8: np.dtype("<u1"),
    DataType.UINT16: np.dtype("<u2"),
    DataType.UINT32: np.dtype("<u4"),
    DataType.UINT64: np.dtype("<u8"),
    DataType.INT8: np.dtype("<i1"),
    DataType.INT16: np.dtype("<i2"),
    DataType.INT32: np.dtype("<i4"),
    DataType.INT64: np.dtype("<i8"),
    DataType.FP16: np.dtype("<f2"),
    DataType.FP32: np.dtype("<f4"),
    DataType.FP64: np.dtype("<f8"),
}
_BY_KIND = {(dt.kind, dt.itemsize): d for d, dt in _NUMPY.items()}

#: Largest rank and element count a request may declare before any bytes are looked at.
MAX_RANK = 8


def check_shape(shape: Sequence[int], *, what: str) -> tuple[int, ...]:
    """Validate a declared shape (non-negative dims, bounded rank) and return it as a tuple."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_RANK:
        raise InvalidInput(f"{what} has rank {len(dims)}; at most {MAX_RANK} dimensions are accepted")
    for d in dims:
        if d < 0:
            raise InvalidInput(f"{what} has shape {list(dims)}; dimensions must be >= 0")
    return dims


def array_from_bytes(data: bytes, dtype: np.dtype[np.generic], shape: Sequence[int], *, name: str) -> np.ndarray:
    """A read-only array over `data` (little-endian, row-major) after checking its length.

    Takes the numpy dtype (`DataType.numpy`) rather than the DataType: this runs per request,
    and hashing an Enum member is a Python-level call.
    """
    dims = tuple(shape)
    if len(dims) > MAX_RANK or (dims and min(dims) < 0):
        check_shape(dims, what=f"input {name!r}")  # raises with the reason
    expected = math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {name!r} has {len(data)} bytes of data, but shape {list(dims)} of "
            f"{DataType.of(dtype).value} needs {expected} bytes"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(dims)
    except ValueError:  # numpy refuses shapes whose size overflows, even with a zero dimension
        raise InvalidInput(f"input {name!r} has shape {list(dims)}, which is too large to address") from None


def array_from_values(values: Sequence[object], datatype: DataType, shape: Sequence[int], *, what: str) -> np.ndarray:
    """An array from typed values (the Open Inference Protocol's `contents`)."""
    dims = check_shape(shape, what=what)
    count = math.prod(dims)
    if len(values) != count:
        raise InvalidInput(
            f"{what} has {len(values)} values, but shape {list(dims)} needs {count} {datatype.value} values"
        )
    target = datatype.numpy
    try:
        if target.kind in "iu" and target.itemsize < 8 and count:
            # Protobuf hands int32/uint32 fields over as C integers, which numpy would wrap silently
            # (300 as INT8 becomes 44): check the range on a wide copy first.
            wide = np.asarray(values, dtype=np.int64)
            info = np.iinfo(target)  # type: ignore[type-var]
            low, high = int(wide.min()), int(wide.max())
            if low < info.min or high > info.max:
                bad = low if low < info.min else high
                raise InvalidInput(
                    f"{what} has values that do not fit {datatype.value}: {bad} is outside {info.min}..{info.max}"
                )
            return wide.astype(target).reshape(dims)
        return np.asarray(values, dtype=target).reshape(dims)
    except (OverflowError, ValueError) as err:
        raise InvalidInput(f"{what} has values that do not fit {datatype.value} or shape {list(dims)}: {err}") from None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, datatype and shape (None for a variable dimension) of a model input or output."""

    name: str
    datatype: DataType
    shape: tuple[int | None, ...]
    # Derived once, for the per-request check: numpy dtype, fixed (axis, size) pairs, batched.
    dtype: np.dtype[np.generic] = field(init=False, repr=False, compare=False)
    fixed_dims: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    batched: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _NUMPY[self.datatype])
        object.__setattr__(self, "fixed_dims", tuple((axis, d) for axis, d in enumerate(self.shape) if d is not None))
        object.__setattr__(self, "batched", bool(self.shape) and self.shape[0] is None)

    def matches(self, array: np.ndarray) -> bool:
        """Whether an array has this spec's dtype, rank and fixed dimensions."""
        if array.dtype != self.dtype:
            return False
        shape = array.shape
        if len(shape) != len(self.shape):
            return False
        for axis, size in self.fixed_dims:  # noqa: SIM110 - a generator per request costs more
            if shape[axis] != size:
                return False
        return True

    @property
    def wire_shape(self) -> list[int]:
        """The shape with -1 for variable dimensions, as protocols report it."""
        return [-1 if d is None else d for d in self.shape]

    def describe(self) -> str:
        """`FP32 [-1, 32]`: for error messages."""
        return f"{self.datatype.value} {self.wire_shape}"
