"""Reader (and a small writer, for tests and fixtures) for the IDX format of MNIST / Fashion-MNIST.

Format (http://yann.lecun.com/exdb/mnist/, bottom of the page): a 4-byte magic number ``0x00 0x00 T D``
where ``T`` is the element type code and ``D`` the number of dimensions, then ``D`` big-endian uint32 sizes,
then the elements in C order, big-endian. Type codes:

====  ===========  =====
code  type         bytes
====  ===========  =====
0x08  uint8        1
0x09  int8         1
0x0B  int16        2
0x0C  int32        4
0x0D  float32      4
0x0E  float64      8
====  ===========  =====

Images are ``0x00000803`` (uint8, 3 dims: N, rows, cols), labels ``0x00000801`` (uint8, 1 dim: N).
Files may be gzip-compressed; compression is detected from the content (gzip magic ``1f 8b``), not the name.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX type code -> numpy dtype (big-endian, as stored on disk).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(2)
        fh.seek(0)
        if head != _GZIP_MAGIC:
            return fh.read()
        try:
            return gzip.decompress(fh.read())
        except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise ValueError(
                f"{path}: corrupt or truncated gzip stream ({exc}); expected a gzip-compressed IDX file. "
                "Delete it and fetch the dataset again."
            ) from exc


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a native-endian numpy array of the stored type and shape.

    Raises ``ValueError`` naming the file when the magic number is wrong, the type code unknown, or the
    file is shorter (or longer) than its header says.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(
            f"{path}: truncated IDX file: {len(data)} bytes, expected at least a 4-byte magic number"
        )
    zero, code, ndim = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(
            f"{path}: not an IDX file: magic number 0x{int.from_bytes(data[:4], 'big'):08X}, expected "
            f"0x0000TTDD with type code TT in ({known}) and DD dimensions (e.g. 0x00000803 for images, "
            "0x00000801 for labels)"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX file: header declares {ndim} dimensions ({header_len} header bytes) "
            f"but the file has only {len(data)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: IDX file {what}: header declares shape {tuple(shape)} of {dtype.name} "
            f"({expected} data bytes) but {actual} data bytes follow the header"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` is true (default: when the name ends .gz)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): c for c, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise ValueError(f"{path}: dtype {array.dtype} has no IDX type code (have {sorted(codes, key=str)})")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[codes[native]]).tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path
