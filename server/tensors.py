"""KServe v2 datatypes and the gateway's internal request/response types."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import ml_dtypes
import numpy as np

# v2 datatype name -> numpy dtype (little-endian, as the protocol sends raw bytes). BF16 is
# ml_dtypes' bfloat16, as in tritonclient; BYTES tensors are object arrays of `bytes`.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: dict[np.dtype, str] = {dtype: name for name, dtype in V2_TO_NUMPY.items()}
V2_DATATYPES = tuple(V2_TO_NUMPY)


def v2_datatype(array: np.ndarray) -> str:
    if array.dtype.kind in "OSU":  # bytes or text elements
        return "BYTES"
    try:
        return NUMPY_TO_V2[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise TypeError(f"numpy dtype {array.dtype} has no KServe v2 datatype") from None


Tensors = Mapping[str, np.ndarray]


@dataclasses.dataclass(slots=True)
class InferRequest:
    """One validated inference request, as the dispatch core sees it."""

    model: str
    inputs: dict[str, np.ndarray]
    id: str = ""
    routing_key: str | None = None
    requested_outputs: tuple[str, ...] = ()
    deadline_s: float | None = None
