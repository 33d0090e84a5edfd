"""geomprobe's activations file format: read, validate, write atomically. No math here.

An activations file is an uncompressed (or compressed) ``.npz`` zip archive; see docs/format.md.
Arrays are read with ``allow_pickle=False``; headers are inspected before any data is loaded so that a
bad file is refused before heavy work. Layers are loaded lazily, one at a time.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: O_EXCL lock files with a pid check instead
    fcntl = None

import numpy as np

from ._validation import InputError, describe_shape
from ._validation import check_positive_int, nonfinite_in_block

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "ActivationFile",
    "Subset",
    "open_activations",
    "save_activations",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_name",
    "available_memory",
    "current_umask",
    "LOCK_NAME",
    "lock_directory",
    "lock_holder",
]

FORMAT_NAME = "geomprobe-activations"
FORMAT_VERSION = 1
SUBSET_NAMES = ("unpermuted", "permuted", "restored", "test", "all")
_KNOWN_TOP = ("labels", "train_labels", "permuted", "split", "meta")
_PREFIXES = ("act/", "grad/", "probe/")


@dataclass(frozen=True)
class Subset:
    """Rows of one analysis subset and the labels that define its classes."""

    name: str
    rows: np.ndarray  # int64 row indices into the file's arrays
    labels: np.ndarray  # int64, len(rows)


def _read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a .npy stream positioned at its start; leaves fh at the data."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    return np.lib.format._read_array_header(fh, version)  # noqa: SLF001


# -- limits checked before any data is read (docs/reliability.md) ----------------------------------
#: zip compression methods numpy writes (savez: stored, savez_compressed: deflated); others are refused
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
#: a deflated member larger than this (uncompressed) may not expand more than MAX_COMPRESSION_RATIO times
RATIO_CHECK_BYTES = 256 * 2**20
MAX_COMPRESSION_RATIO = 200
#: the 'meta' JSON: at most this many bytes and this nesting depth
MAX_META_BYTES = 4 * 2**20
MAX_META_DEPTH = 64


def available_memory() -> int | None:
    """Bytes of memory available to this process (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(nbytes: int, what: str) -> None:
    """InputError when loading ``nbytes`` would exceed the memory available now."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise InputError(
            f"{what} needs {_gib(nbytes)} of memory but only {_gib(avail)} is available; analyse it on a "
            "larger machine or stream it (--stream-batch-rows, docs/scaling.md)"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _json_depth(text: str) -> int:
    """Maximum nesting depth of [ and { in a JSON text (strings skipped); no recursion."""
    depth = best = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            best = max(best, depth)
        elif ch in "]}":
            depth -= 1
    return best


def check_name(name: str, what: str) -> str:
    """A layer or tensor name as the format allows it: non-empty, no '/', not starting with '.',
    no control characters (so 'act/../../x', 'act/a/b', 'act/' and 'act/.' are refused)."""
    if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".")
            or any(ord(c) < 32 for c in name)):
        raise InputError(
            f"{what} name must be non-empty, without '/' or '\\', not starting with '.' and without control "
            f"characters, got {name!r}"
        )
    return name


def _check_regular_file(p: Path) -> None:
    """Refuse what is not a regular file before opening it (a FIFO would block, /dev/zero never ends)."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{p}: is a directory, expected an activations .npz file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device"
                if stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise InputError(f"{p}: is {kind}; geomprobe reads regular .npz files only (copy the data to a file)")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: permission denied (not readable)")


def _check_member(info: zipfile.ZipInfo, path: Path) -> None:
    """Zip-level rules of one member: a method numpy writes, not encrypted, a bounded expansion."""
    name = info.filename
    if info.compress_type not in _METHODS:
        raise InputError(
            f"{path}: member '{name}' uses zip compression method {info.compress_type}; geomprobe reads "
            "stored or deflated members (as numpy.savez / numpy.savez_compressed write them): re-save the "
            "arrays with numpy.savez"
        )
    if info.flag_bits & 0x1:
        raise InputError(f"{path}: member '{name}' is encrypted; save the arrays unencrypted (numpy.savez)")
    if (info.compress_type == zipfile.ZIP_DEFLATED and info.file_size > RATIO_CHECK_BYTES
            and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)):
        raise InputError(
            f"{path}: member '{name}' expands {info.compress_size} compressed bytes to {info.file_size} "
            f"(ratio {info.file_size / max(info.compress_size, 1):.0f} > {MAX_COMPRESSION_RATIO}, a zip bomb "
            "or a constant array); save such arrays uncompressed (numpy.savez)"
        )


def _header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Read a .npy member's shape and dtype without loading its data, and check that the data its
    header declares is really stored (a header claiming 10^12 rows in a small member is refused)."""
    member = info.filename
    key = member[:-4]
    try:
        with zf.open(info) as fh:
            shape, _, dtype = _read_npy_header(fh)
            header_len = fh.tell()
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error, SyntaxError, TypeError,
            NotImplementedError, RuntimeError) as exc:
        raise InputError(f"{path}: key '{key}' is not a readable .npy array ({exc})") from None
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    if any(s < 0 for s in shape):
        raise InputError(f"{path}: key '{key}' declares a negative dimension: shape {describe_shape(shape)}")
    if not dtype.hasobject:
        declared = math.prod(shape) * dtype.itemsize
        stored = info.file_size - header_len
        if declared > stored:
            raise InputError(
                f"{path}: key '{key}' declares shape {describe_shape(shape)} of {dtype} ({declared} bytes) but "
                f"its zip member holds only {max(stored, 0)} data bytes; the file is corrupt or crafted"
            )
    return shape, dtype


def _native(arr: np.ndarray) -> np.ndarray:
    """The array in native byte order (big-endian files are accepted and converted)."""
    if arr.dtype.byteorder not in ("=", "|") and not arr.dtype.isnative:
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _is_float(dtype: np.dtype) -> bool:
    return dtype.kind == "f" and dtype.itemsize in (2, 4, 8)


def _float_rule(key: str, dtype: np.dtype) -> str:
    return (f"'{key}' must be float16, float32 or float64 (either byte order), got {dtype}; convert it with "
            "arr.astype(numpy.float32)")


class ActivationFile:
    """A validated, lazily read activations file. Use :func:`open_activations`.

    Attributes: ``path``, ``labels`` (int64, n), ``layers`` (ordered layer names), ``meta`` (dict),
    ``train_labels``, ``permuted``, ``split`` (None when absent), ``grad_tensors`` ({layer: [tensor]}),
    ``label_names`` (the class names when the file's labels are strings, code i = label_names[i];
    else None), ``identity`` (size, mtime and the zip CRCs: what resume keys are made of).
    """

    def __init__(self, path: str | os.PathLike, *, scan_values: bool = False):
        self.path = Path(path)
        p = self.path
        _check_regular_file(p)
        try:
            st = os.stat(p)
            zf = zipfile.ZipFile(p)
            infos = zf.infolist()
        except zipfile.BadZipFile:
            raise InputError(
                f"{p}: not a zip archive (.npz) or a corrupt one; geomprobe reads .npz files written by "
                "numpy.savez or geomprobe.io.save_activations (pickles are never loaded)"
            ) from None
        except (OSError, EOFError, ValueError, OverflowError, struct.error) as exc:
            raise InputError(f"{p}: corrupt or truncated zip archive ({exc})") from None
        self._zip = zf
        try:
            self._read_headers(zf, infos, st)
            self._validate_structure()
            if scan_values:
                self.scan_values()
        except BaseException:
            zf.close()
            raise

    def _read_headers(self, zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], st: os.stat_result) -> None:
        p = self.path
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._crc: dict[str, tuple[int, int]] = {}
        order: list[str] = []
        for info in infos:
            m = info.filename
            if m.endswith("/"):
                continue
            if not m.endswith(".npy"):
                raise InputError(f"{p}: member '{m}' is not a .npy array; not an activations file")
            key = m[:-4]
            if key in self._headers:
                raise InputError(f"{p}: member '{m}' appears more than once; a valid .npz holds each key once")
            _check_member(info, p)
            shape, dtype = _header(zf, info, p)
            if dtype.hasobject:
                raise InputError(
                    f"{p}: key '{key}' holds Python objects (dtype {dtype}); geomprobe never unpickles "
                    "data (allow_pickle=False): save numeric arrays"
                )
            self._headers[key] = (shape, dtype)
            self._crc[key] = (info.CRC, info.file_size)
            order.append(key)
        self._order = order
        self._stat = (int(st.st_size), int(st.st_mtime_ns))

    def identity(self, keys=None) -> dict[str, Any]:
        """What identifies the data of ``keys`` (default: all): the file's size and mtime and a hash of
        those members' names, zip CRC-32s and sizes (the CRCs cover every stored byte)."""
        keys = self._order if keys is None else [k for k in keys if k in self._crc]
        h = hashlib.sha256()
        for k in sorted(keys):
            crc, size = self._crc[k]
            h.update(f"{k}\0{crc:08x}\0{size}\n".encode())
        return {"size": self._stat[0], "mtime_ns": self._stat[1], "content": h.hexdigest()[:32]}

    # -- structure -----------------------------------------------------------------------------
    def _validate_structure(self) -> None:
        p = self.path
        h = self._headers
        unknown = [k for k in self._order if k not in _KNOWN_TOP and not k.startswith(_PREFIXES)]
        if unknown:
            raise InputError(
                f"{p}: unknown key(s) {', '.join(map(repr, unknown[:5]))}; allowed: labels, train_labels, "
                "permuted, split, meta, act/<layer>, grad/<layer>/<tensor>, probe/..."
            )
        for k in self._order:  # format rules on names: act/<layer>, grad/<layer>/<tensor>, probe/<a>/<b>...
            if k.startswith("act/"):
                check_name(k[4:], f"{p}: key '{k}': layer")
            elif k.startswith(("grad/", "probe/")):
                for part in k.split("/")[1:]:
                    check_name(part, f"{p}: key '{k}': each part of the")
        self.meta: dict[str, Any] = {}
        if "meta" in h:
            mshape, mdtype = h["meta"]
            if mdtype.kind not in "US" or mshape != ():
                raise InputError(
                    f"{p}: key 'meta' must be a 0-d JSON string, got dtype {mdtype} shape {describe_shape(mshape)}"
                )
            if mdtype.itemsize > MAX_META_BYTES:
                raise InputError(f"{p}: key 'meta' holds {mdtype.itemsize} bytes; the limit is {MAX_META_BYTES}")
            raw = self.array("meta")
            try:
                text = str(raw.item() if raw.dtype.kind == "U" else raw.item().decode())
            except UnicodeDecodeError as exc:
                raise InputError(f"{p}: key 'meta' is not valid UTF-8 ({exc})") from None
            depth = _json_depth(text)
            if depth > MAX_META_DEPTH:
                raise InputError(f"{p}: key 'meta' is nested {depth} levels deep; the limit is {MAX_META_DEPTH}")
            try:
                meta = json.loads(text)
            except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                raise InputError(f"{p}: key 'meta' is not valid JSON ({exc})") from None
            if not isinstance(meta, dict):
                raise InputError(f"{p}: key 'meta' must be a JSON object, got {type(meta).__name__}")
            version = meta.get("format_version", FORMAT_VERSION)
            if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
                raise InputError(
                    f"{p}: format_version {version!r} in meta is not supported (this geomprobe reads "
                    f"versions 1..{FORMAT_VERSION})"
                )
            self.meta = meta
        if "labels" not in h:
            raise InputError(
                f"{p}: missing required key 'labels'; keys present: {', '.join(self._order) or '(none)'}"
            )
        lshape, ldtype = h["labels"]
        if len(lshape) != 1:
            raise InputError(f"{p}: 'labels' must be 1-D (n,), got shape {describe_shape(lshape)}")
        if ldtype.kind not in "iubUS":
            raise InputError(
                f"{p}: 'labels' must be integers, got dtype {ldtype} (class-name strings are also accepted and "
                "encoded); convert float class ids with labels.astype(numpy.int64)"
            )
        n = lshape[0]
        if n == 0:
            raise InputError(f"{p}: 'labels' is empty (0 examples)")
        self.n = n
        self.layers = [k[4:] for k in self._order if k.startswith("act/")]
        for layer in self.layers:
            shape, dtype = h["act/" + layer]
            key = f"act/{layer}"
            if len(shape) < 2:
                raise InputError(
                    f"{p}: '{key}' must be at least 2-D (n, features...), got shape {describe_shape(shape)}"
                )
            if shape[0] != n:
                raise InputError(f"{p}: '{key}' has {shape[0]} rows but 'labels' has {n} entries")
            if int(np.prod(shape[1:])) == 0:
                raise InputError(f"{p}: '{key}' is empty: shape {describe_shape(shape)} has 0 features")
            if not _is_float(dtype):
                raise InputError(f"{p}: {_float_rule(key, dtype)}")
        self.grad_tensors: dict[str, list[str]] = {}
        for k in self._order:
            if not k.startswith("grad/"):
                continue
            parts = k.split("/")
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise InputError(f"{p}: gradient key '{k}' must be grad/<layer>/<tensor>")
            shape, dtype = h[k]
            if len(shape) < 2 or shape[0] != n:
                raise InputError(
                    f"{p}: '{k}' must be (n, ...) with n = {n} rows (one gradient per example), got shape "
                    f"{describe_shape(shape)}"
                )
            if not _is_float(dtype):
                raise InputError(f"{p}: {_float_rule(k, dtype)}")
            self.grad_tensors.setdefault(parts[1], []).append(parts[2])
        string_labels = ldtype.kind in "US"
        for k, kinds in (("train_labels", "US" if string_labels else "iub"), ("permuted", "b"), ("split", "US")):
            if k not in h:
                continue
            shape, dtype = h[k]
            if shape != (n,):
                raise InputError(f"{p}: '{k}' has shape {describe_shape(shape)} but 'labels' has {n} entries")
            if dtype.kind not in kinds:
                rule = {"train_labels": "strings like 'labels'" if string_labels else "integers",
                        "permuted": "bool", "split": "strings 'train'/'test'"}[k]
                raise InputError(f"{p}: '{k}' must be {rule}, got dtype {dtype}")
        if not self.layers and not self.grad_tensors and not any(k.startswith("probe/") for k in self._order):
            raise InputError(f"{p}: no 'act/<layer>', 'grad/<layer>/<tensor>' or 'probe/...' keys: nothing to analyse")
        for k in ("labels", "train_labels", "permuted", "split"):
            if k in h:
                check_fits_in_memory(self.nbytes(k), f"{p}: '{k}'")
        self.label_names: list[str] | None = None
        if string_labels:
            self.labels, self.train_labels, self.label_names = self._encode_string_labels(h)
        else:
            self.labels = self._int_labels("labels")
            self.train_labels = self._int_labels("train_labels") if "train_labels" in h else None
        self.permuted = self.array("permuted") if "permuted" in h else None
        self.split = None
        if "split" in h:
            split = self.array("split")
            if split.dtype.kind == "S":
                split = split.astype("U")
            bad = ~np.isin(split, ("train", "test"))
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"{p}: 'split' must hold 'train' or 'test', got {str(split[i])!r} at index {i}")
            self.split = split

    def _int_labels(self, key: str) -> np.ndarray:
        arr = _native(self.array(key))
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            i = int(np.argmax(arr))
            raise InputError(f"{self.path}: '{key}' must fit in int64, got {int(arr[i])} at index {i}")
        return arr.astype(np.int64)

    def _encode_string_labels(self, h) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """String class names -> codes 0..K-1 in sorted name order (shared by labels and train_labels)."""
        def load(k):
            a = self.array(k)
            return a.astype("U") if a.dtype.kind == "S" else a

        lab = load("labels")
        tl = load("train_labels") if "train_labels" in h else None
        names = np.unique(lab if tl is None else np.concatenate([lab, tl]))
        codes = np.searchsorted(names, lab).astype(np.int64)
        tcodes = None if tl is None else np.searchsorted(names, tl).astype(np.int64)
        return codes, tcodes, [str(x) for x in names]

    # -- access --------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """All array keys in file order."""
        return list(self._order)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._headers[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self._headers[key][1]

    def array(self, key: str) -> np.ndarray:
        """Load one array (allow_pickle=False)."""
        if key not in self._headers:
            raise InputError(f"{self.path}: no key '{key}'; keys present: {', '.join(self._order)}")
        check_fits_in_memory(self.nbytes(key), f"{self.path}: '{key}'")
        try:
            with self._zip.open(key + ".npy") as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise InputError(f"{self.path}: key '{key}' could not be read ({exc})") from None

    def layer(self, name: str) -> np.ndarray:
        """Activations of one layer, flattened to (n, features); float16 promoted to float32."""
        if name not in self.layers:
            raise InputError(f"{self.path}: no layer '{name}'; layers: {', '.join(self.layers) or '(none)'}")
        return self._flat(self.array("act/" + name))

    def grad(self, layer: str, tensor: str) -> np.ndarray:
        """Per-example gradients of one tensor, flattened to (n, features)."""
        return self._flat(self.array(f"grad/{layer}/{tensor}"))

    @staticmethod
    def _flat(arr: np.ndarray) -> np.ndarray:
        arr = _native(arr.reshape(arr.shape[0], -1))
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        return np.ascontiguousarray(arr)

    def scan_values(self, *, batch_rows: int = 8192) -> None:
        """Full check of the data: the zip's CRCs (a corrupted member), and every activation and
        gradient array for NaN/Inf (count and first position). Streams row batches: memory
        O(batch_rows x features), never a whole array."""
        try:
            bad = self._zip.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise InputError(f"{self.path}: corrupt or truncated zip archive ({exc})") from None
        if bad is not None:
            raise InputError(f"{self.path}: corrupt or truncated zip archive (CRC error in member '{bad}')")
        for key in self._order:
            if not key.startswith(("act/", "grad/")):
                continue
            count, first = 0, None
            for pos, block in self.iter_rows(key, batch_rows=batch_rows):
                c, at = nonfinite_in_block(block)
                if c:
                    count += c
                    if first is None:
                        first = (int(pos[at[0]]), at[1])
            if count:
                raise InputError(
                    f"{self.path}: '{key}' contains {count} non-finite value(s) (NaN or Inf); first at row "
                    f"{first[0]}, column {first[1]}"
                )

    # -- streaming row batches (docs/scaling.md) --------------------------------------------------
    def nbytes(self, key: str) -> int:
        """Size in bytes of one array once loaded (from its header; nothing is read)."""
        if key not in self._headers:
            raise InputError(f"{self.path}: no key '{key}'; keys present: {', '.join(self._order)}")
        shape, dtype = self._headers[key]
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def is_stored(self, key: str) -> bool:
        """True when the key's member is stored uncompressed (ZIP_STORED): it can be memory-mapped."""
        if key not in self._headers:
            raise InputError(f"{self.path}: no key '{key}'; keys present: {', '.join(self._order)}")
        return self._zip.getinfo(key + ".npy").compress_type == zipfile.ZIP_STORED

    def _npy_layout(self, key: str) -> tuple[int, bool]:
        """(offset of the array data inside its .npy member, fortran_order)."""
        with self._zip.open(key + ".npy") as fh:
            _, fortran, _ = _read_npy_header(fh)
            return fh.tell(), bool(fortran)

    def _member_data_offset(self, key: str) -> int:
        """Byte offset in the .npz file where a stored member's data (its .npy bytes) begins."""
        info = self._zip.getinfo(key + ".npy")
        with open(self.path, "rb") as fh:
            fh.seek(info.header_offset)
            head = fh.read(30)  # zip local file header: fixed 30 bytes, then name and extra field
        if len(head) != 30 or head[:4] != b"PK\x03\x04":
            raise InputError(f"{self.path}: key '{key}': bad zip local header; corrupt archive")
        name_len = int.from_bytes(head[26:28], "little")
        extra_len = int.from_bytes(head[28:30], "little")
        return info.header_offset + 30 + name_len + extra_len

    def iter_rows(self, key: str, rows=None, *, batch_rows: int = 8192):
        """Yield ``(positions, block)`` batches of the rows of one array without loading it whole.

        ``rows`` (default: all) are row indices; they are visited in ascending file order (stable for
        repeats) in batches of ``batch_rows`` selected rows; ``positions`` are indices into ``rows``
        (into the file's rows when ``rows`` is None) and ``block`` is (len(positions), features),
        flattened like :meth:`layer` (float16 promoted to float32). An uncompressed member is
        memory-mapped at its data offset; a compressed one is decompressed sequentially, holding one
        chunk of ``batch_rows`` file rows at a time. Both give the same batches, so results computed
        from them do not depend on how the file was compressed. Memory: O(batch_rows x features).
        """
        if key not in self._headers:
            raise InputError(f"{self.path}: no key '{key}'; keys present: {', '.join(self._order)}")
        bs = check_positive_int(batch_rows, "batch_rows")
        shape, dtype = self._headers[key]
        if len(shape) < 1:
            raise InputError(f"{self.path}: '{key}' is 0-d; it has no rows to stream")
        n = shape[0]
        if rows is None:
            sel = np.arange(n, dtype=np.int64)
        else:
            sel = np.asarray(rows)
            if sel.ndim != 1 or (sel.size and sel.dtype.kind not in "iu"):
                raise InputError(f"rows must be a 1-D integer array, got dtype {sel.dtype} shape {sel.shape}")
            sel = sel.astype(np.int64)
            if sel.size and (sel.min() < 0 or sel.max() >= n):
                bad = int(sel[(sel < 0) | (sel >= n)][0])
                raise InputError(f"{self.path}: '{key}' has {n} rows; row index {bad} is out of range")
        order = np.argsort(sel, kind="stable")
        sorted_rows = sel[order]
        if sorted_rows.size == 0:
            return
        data_off, fortran = self._npy_layout(key)
        if self.is_stored(key):
            mm = np.memmap(self.path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C",
                           offset=self._member_data_offset(key) + data_off)
            try:
                for i in range(0, sorted_rows.size, bs):
                    r = sorted_rows[i:i + bs]
                    if r[-1] - r[0] + 1 == r.size:  # a contiguous run: slice, no fancy-index copy first
                        block = np.array(mm[r[0]:r[-1] + 1])
                    else:
                        block = np.asarray(mm[r])
                    yield order[i:i + bs], self._flat(block)
            finally:
                del mm
            return
        if fortran and len(shape) > 1:
            raise InputError(
                f"{self.path}: '{key}' is compressed and stored in Fortran (column) order, so it cannot be "
                "read in row batches; save it uncompressed or as a C-ordered array (np.ascontiguousarray)"
            )
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        row_bytes = row_items * dtype.itemsize
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        n_pending = 0
        done = 0  # selected rows already yielded or pending
        try:
            with self._zip.open(key + ".npy") as fh:
                fh.read(data_off)
                for start in range(0, n, bs):
                    stop = min(n, start + bs)
                    hi = int(np.searchsorted(sorted_rows, stop, side="left"))
                    want = (stop - start) * row_bytes
                    buf = fh.read(want)
                    if len(buf) != want:
                        raise InputError(f"{self.path}: key '{key}' is truncated (rows {start}..{stop - 1})")
                    if hi == done:
                        continue  # no selected row in this chunk: decompressed and dropped
                    chunk = np.frombuffer(buf, dtype=dtype).reshape((stop - start,) + tuple(shape[1:]))
                    pending.append((order[done:hi], chunk[sorted_rows[done:hi] - start]))
                    n_pending += hi - done
                    done = hi
                    while n_pending >= bs:
                        pos = np.concatenate([p for p, _ in pending])
                        blk = np.concatenate([b for _, b in pending])
                        yield pos[:bs], self._flat(blk[:bs])
                        pending = [(pos[bs:], blk[bs:])] if pos.size > bs else []
                        n_pending -= bs
                    if done == sorted_rows.size:
                        break
        except InputError:
            raise
        except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error, struct.error) as exc:
            raise InputError(f"{self.path}: key '{key}' could not be read ({exc})") from None
        if n_pending:
            yield np.concatenate([p for p, _ in pending]), self._flat(np.concatenate([b for _, b in pending]))

    # -- subsets (paper 003) --------------------------------------------------------------------
    @property
    def has_subsets(self) -> bool:
        return self.train_labels is not None or self.permuted is not None or self.split is not None

    def subsets(self) -> dict[str, Subset]:
        """The analysis subsets in a fixed order; empty ones are left out (see :meth:`empty_subsets`).

        With none of train_labels / permuted / split: one subset ``all`` with the true labels. Otherwise
        unpermuted (train, not permuted, true labels), permuted (train, permuted, training labels),
        restored (the same examples, true labels) and test (test split, true labels).
        """
        memo = getattr(self, "_subsets_memo", None)
        if memo is None:
            memo = {name: Subset(name, rows, labels) for name, (rows, labels) in self._subset_rows().items()
                    if rows.size}
            self._subsets_memo = memo
        return dict(memo)

    def empty_subsets(self) -> list[str]:
        return [name for name, (rows, _) in self._subset_rows().items() if rows.size == 0]

    def _subset_rows(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        n = self.n
        if not self.has_subsets:
            return {"all": (np.arange(n, dtype=np.int64), self.labels)}
        train = np.ones(n, bool) if self.split is None else self.split == "train"
        perm = np.zeros(n, bool) if self.permuted is None else self.permuted.astype(bool)
        tl = self.labels if self.train_labels is None else self.train_labels
        r_unp = np.flatnonzero(train & ~perm)
        r_perm = np.flatnonzero(train & perm)
        r_test = np.flatnonzero(~train)
        return {
            "unpermuted": (r_unp, self.labels[r_unp]),
            "permuted": (r_perm, tl[r_perm]),
            "restored": (r_perm, self.labels[r_perm]),
            "test": (r_test, self.labels[r_test]),
        }

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> ActivationFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ActivationFile({str(self.path)!r}, n={self.n}, layers={self.layers})"


def open_activations(path: str | os.PathLike, *, scan_values: bool = False) -> ActivationFile:
    """Open and validate an activations file (headers only unless ``scan_values``)."""
    return ActivationFile(path, scan_values=scan_values)


# -- writing -------------------------------------------------------------------------------------
def _atomic_target(path: Path, force: bool) -> None:
    if path.is_dir():
        raise InputError(f"{path}: is a directory; cannot write a file there")
    if path.exists() and not force:
        raise InputError(f"{path}: already exists; pass force=True (CLI: --force) to overwrite")
    if not path.parent.is_dir():
        raise InputError(f"{path}: directory {path.parent} does not exist")


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (read by setting and restoring it, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _final_mode(path: Path) -> int:
    """Mode of a file written over ``path``: the replaced file's permissions, else 0666 & ~umask (what
    open() would give), never mkstemp's 0600."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = True) -> Path:
    """Write data to path via a temporary file in the same directory, fsync and os.replace: a reader
    sees the old file or the new one, never a part. The mode follows the umask (or the replaced file).
    An OS error (disk full, file-size limit, permissions) is an InputError naming the path; the old
    file is then left intact."""
    path = Path(path)
    _atomic_target(path, force)
    mode = _final_mode(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise InputError(
            f"{path}: could not be written ({exc.strerror or exc}); any previous version is left intact"
        ) from None
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, force: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def save_activations(
    path: str | os.PathLike,
    labels: Any,
    activations: Mapping[str, Any],
    *,
    train_labels: Any = None,
    permuted: Any = None,
    split: Any = None,
    grads: Mapping[str, Mapping[str, Any]] | None = None,
    extra: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
    compress: bool = False,
) -> Path:
    """Write an activations file atomically (temporary file + rename); never overwrites unless force.

    ``activations`` maps layer name -> (n, ...) float array, in layer order. ``grads`` maps layer ->
    {tensor -> (n, ...)}; ``extra`` maps extra keys (must start with 'probe/') -> array; ``meta`` is a
    JSON-able dict (provenance, epoch, seed), stored with the format name and version. The written
    file is re-opened and validated before it replaces the target.
    """
    path = Path(path)
    _atomic_target(path, force)
    arrays: dict[str, np.ndarray] = {}
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iub":
        raise InputError(f"labels must be a 1-D integer array, got dtype {lab.dtype} shape {lab.shape}")
    arrays["labels"] = lab.astype(np.int64)
    if train_labels is not None:
        arrays["train_labels"] = np.asarray(train_labels).astype(np.int64)
    if permuted is not None:
        arrays["permuted"] = np.asarray(permuted).astype(bool)
    if split is not None:
        arrays["split"] = np.asarray(split).astype("<U5")
    info = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
    info.update(dict(meta or {}))
    info["format"], info["format_version"] = FORMAT_NAME, FORMAT_VERSION
    try:
        arrays["meta"] = np.array(json.dumps(info, sort_keys=False))
    except (TypeError, ValueError) as exc:
        raise InputError(f"meta must be JSON-serialisable: {exc}") from None
    for name, value in activations.items():
        arr = np.asarray(value)
        if arr.dtype not in (np.float16, np.float32, np.float64):
            arr = arr.astype(np.float32)
        arrays["act/" + check_name(name, "layer")] = arr
    for layer, tensors in (grads or {}).items():
        for tname, value in tensors.items():
            arrays[f"grad/{check_name(layer, 'layer')}/{check_name(tname, 'tensor')}"] = np.asarray(value)
    for key, value in (extra or {}).items():
        if not key.startswith("probe/"):
            raise InputError(f"extra key {key!r} must start with 'probe/'")
        arrays[key] = np.asarray(value)
    for key, arr in arrays.items():
        if arr.dtype.hasobject:
            raise InputError(f"'{key}' has dtype object; save numeric arrays")
    mode = _final_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, mode)
        (np.savez_compressed if compress else np.savez)(tmp, **arrays)
        try:
            ActivationFile(tmp).close()  # validate what was written before it replaces anything
        except InputError as exc:  # name the user's target, not the temporary file
            raise InputError(str(exc).replace(str(tmp), str(path))) from None
        if path.exists() and not force:  # re-check: another writer may have appeared meanwhile
            raise InputError(f"{path}: already exists; pass force=True (CLI: --force) to overwrite")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# -- one writer per directory ----------------------------------------------------------------------
LOCK_NAME = ".geomprobe.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _describe_holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}; "
                f"lock file {path}")
    except (OSError, ValueError, AttributeError):
        return f"lock file {path}"


def lock_holder(directory: str | os.PathLike) -> str | None:
    """A description of the live run holding ``directory``'s lock, or None when it is free (no lock
    file, or one left by a process that is gone: a stale lock)."""
    path = Path(directory) / LOCK_NAME
    if not path.exists():
        return None
    if fcntl is not None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _describe_holder(path)
        finally:
            os.close(fd)  # closing drops the probe's shared lock
        return None
    try:  # pragma: no cover - Windows
        pid = int(json.loads(path.read_text()).get("pid", -1))
    except (OSError, ValueError, AttributeError):
        return None
    return _describe_holder(path) if pid > 0 and _pid_alive(pid) else None  # pragma: no cover


@contextmanager
def lock_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``directory`` (the file ``.geomprobe.lock`` in it) for the block.

    POSIX: an ``flock`` on the lock file, which the kernel releases when the process ends however it
    ends, so a lock file left by a killed run is stale and taken over. The file names the holder (pid,
    host, start time) for the message of a run that finds it taken: InputError at once, never a wait.
    The lock file is removed when the block ends."""
    import datetime
    import socket

    path = Path(directory) / LOCK_NAME
    fd = None
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | (0 if fcntl is not None else os.O_EXCL), 0o666)
        except FileExistsError:  # pragma: no cover - Windows
            if lock_holder(directory) is None:
                path.unlink(missing_ok=True)
                continue
            raise InputError(f"output directory {directory} is in use by another geomprobe run "
                             f"({_describe_holder(path)})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
        if fcntl is None:  # pragma: no cover
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(
                f"output directory {directory} is in use by another geomprobe run ({_describe_holder(path)}); "
                "wait for it to finish or choose another -o"
            ) from None
        try:  # the holder may have removed the file between our open and flock: lock the current one
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        fd = None
    if fd is None:  # pragma: no cover - endless contention
        raise InputError(f"output directory {directory}: could not take the lock {path}")
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield path
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)
