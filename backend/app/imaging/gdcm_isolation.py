"""GDCM as the last-resort DICOM pixel decoder, run in a child process, never in the server's.

GDCM's C++ codecs abort the whole process on some corrupt data: an uncaught ``gdcm::Exception``
ends in ``std::terminate`` (found by fuzzing uploads — a JPEG Baseline file with a few bytes
changed killed the interpreter, so one upload could take the API or a worker down). pydicom tries
GDCM *first* for the JPEG, JPEG-LS and JPEG 2000 syntaxes. The other installed plugins
(pylibjpeg with libjpeg / openjpeg / rle, Pillow, pyjpegls) decode every toolkit file the test
data holds with the same outcome as with GDCM (146 files, 2026-12-02), so:

* :func:`keep_gdcm_out_of_process` removes GDCM from pydicom's in-process decoders;
* :func:`decode_frame` is tried only when every in-process decoder failed: a fresh Python reads
  the file from its stdin, decodes the frame with GDCM and writes the array to its stdout as
  ``.npy`` (nothing on disk, nothing logged). Its crash, error or timeout is the file's problem —
  the caller answers the upload with a 4xx — and the server goes on.
"""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import threading

import numpy as np

#: Seconds the child may take to decode one frame.
TIMEOUT_S = 60.0

_CHILD = r"""
import io, sys
import numpy as np
import pydicom
from pydicom.pixels import pixel_array

index, syntax = int(sys.argv[1]), sys.argv[2]
ds = pydicom.dcmread(io.BytesIO(sys.stdin.buffer.read()), force=True)
if not ds.file_meta.get("TransferSyntaxUID"):
    ds.file_meta.TransferSyntaxUID = syntax
array = pixel_array(ds, index=None if index < 0 else index, decoding_plugin="gdcm")
out = io.BytesIO()  # a pipe has no file position for numpy to write at
np.save(out, np.ascontiguousarray(array), allow_pickle=False)
sys.stdout.buffer.write(out.getvalue())
"""

#: Children decoding at once: each is a Python process, so a burst of corrupt uploads cannot
#: fork the server into the ground (the others wait their turn).
MAX_CHILDREN = 2
_children = threading.BoundedSemaphore(MAX_CHILDREN)

_removed_lock = threading.Lock()
_removed: set[str] = set()


def _decoders():
    from pydicom.pixels import get_decoder
    from pydicom.uid import AllTransferSyntaxes

    for uid in AllTransferSyntaxes:
        try:
            yield uid, get_decoder(uid)
        except NotImplementedError:
            continue


_done = False


def keep_gdcm_out_of_process() -> None:
    """Remove GDCM from pydicom's in-process decoders (idempotent; remembers what it removed)."""
    global _done
    if _done:
        return
    with _removed_lock:
        if _done:
            return
        for uid, decoder in _decoders():
            if "gdcm" in decoder.available_plugins or "gdcm" in getattr(decoder, "_unavailable", {}):
                decoder.remove_plugin("gdcm")
                _removed.add(str(uid))
        _done = True


@functools.cache
def gdcm_installed() -> bool:
    try:
        import gdcm  # noqa: F401
    except ImportError:
        return False
    return True


def can_decode(syntax) -> bool:
    """Whether the child could try ``syntax`` (GDCM is installed and was a decoder of it)."""
    return gdcm_installed() and str(syntax) in _removed


def decode_frame(data: bytes, index: int | None, syntax, timeout_s: float = TIMEOUT_S) -> np.ndarray | None:
    """Frame ``index`` (None: the only frame) of the DICOM file ``data``, decoded by GDCM in a child
    process; None when GDCM cannot decode it (error, crash or timeout of the child)."""
    if not can_decode(syntax):
        return None
    command = [sys.executable, "-I", "-c", _CHILD, str(-1 if index is None else int(index)), str(syntax)]
    try:
        with _children:
            result = subprocess.run(command, input=data, capture_output=True, timeout=timeout_s, check=False)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if result.returncode != 0 or not result.stdout:
        return None  # its stderr may quote the file: not logged
    try:
        return np.load(io.BytesIO(result.stdout), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return None
