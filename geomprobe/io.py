"""geomprobe's activations file format: read, validate, write atomically. No math here.

An activations file is an uncompressed (or compressed) ``.npz`` zip archive; see docs/format.md.
Arrays are read with ``allow_pickle=False``; headers are inspected before any data is loaded so that a
bad file is refused before heavy work. Layers are loaded lazily, one at a time.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _header(zf: zipfile.ZipFile, member: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Read a .npy member's shape and dtype without loading its data."""
    key = member[:-4]
    try:
        with zf.open(member) as fh:
            shape, _, dtype = _read_npy_header(fh)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: key '{key}' is not a readable .npy array ({exc})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


class ActivationFile:
    """A validated, lazily read activations file. Use :func:`open_activations`.

    Attributes: ``path``, ``labels`` (int64, n), ``layers`` (ordered layer names), ``meta`` (dict),
    ``train_labels``, ``permuted``, ``split`` (None when absent), ``grad_tensors`` ({layer: [tensor]}).
    """

    def __init__(self, path: str | os.PathLike, *, scan_values: bool = False):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise InputError(f"{p}: no such file")
        if p.is_dir():
            raise InputError(f"{p}: is a directory, expected an activations .npz file")
        if not zipfile.is_zipfile(p):
            raise InputError(
                f"{p}: not a zip archive (.npz); geomprobe reads .npz files written by numpy.savez "
                "or geomprobe.io.save_activations (pickles are never loaded)"
            )
        try:
            zf = zipfile.ZipFile(p)
            members = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise InputError(f"{p}: corrupt or truncated zip archive ({exc})") from None
        self._zip = zf
        self._headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        order: list[str] = []
        for m in members:
            if m.endswith("/"):
                continue
            if not m.endswith(".npy"):
                raise InputError(f"{p}: member '{m}' is not a .npy array; not an activations file")
            shape, dtype = _header(zf, m, p)
            key = m[:-4]
            if dtype.hasobject:
                raise InputError(
                    f"{p}: key '{key}' holds Python objects (dtype {dtype}); geomprobe never unpickles "
                    "data (allow_pickle=False): save numeric arrays"
                )
            self._headers[key] = (shape, dtype)
            order.append(key)
        self._order = order
        self._validate_structure()
        if scan_values:
            self.scan_values()

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
        self.meta: dict[str, Any] = {}
        if "meta" in h:
            raw = self.array("meta")
            if raw.dtype.kind not in "US" or raw.ndim != 0:
                raise InputError(f"{p}: key 'meta' must be a 0-d JSON string, got dtype {raw.dtype} shape {raw.shape}")
            try:
                meta = json.loads(str(raw.item() if raw.dtype.kind == "U" else raw.item().decode()))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
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
        if ldtype.kind not in "iub":
            raise InputError(f"{p}: 'labels' must be integers, got dtype {ldtype}")
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
            if dtype not in (np.float16, np.float32, np.float64):
                raise InputError(f"{p}: '{key}' must be float16, float32 or float64, got {dtype}")
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
            if dtype not in (np.float16, np.float32, np.float64):
                raise InputError(f"{p}: '{k}' must be float16, float32 or float64, got {dtype}")
            self.grad_tensors.setdefault(parts[1], []).append(parts[2])
        for k, kinds in (("train_labels", "iub"), ("permuted", "b"), ("split", "U")):
            if k not in h:
                continue
            shape, dtype = h[k]
            if shape != (n,):
                raise InputError(f"{p}: '{k}' has shape {describe_shape(shape)} but 'labels' has {n} entries")
            if dtype.kind not in kinds:
                rule = {"train_labels": "integers", "permuted": "bool", "split": "strings 'train'/'test'"}[k]
                raise InputError(f"{p}: '{k}' must be {rule}, got dtype {dtype}")
        if not self.layers and not self.grad_tensors and not any(k.startswith("probe/") for k in self._order):
            raise InputError(f"{p}: no 'act/<layer>', 'grad/<layer>/<tensor>' or 'probe/...' keys: nothing to analyse")
        self.labels = self.array("labels").astype(np.int64)
        self.train_labels = self.array("train_labels").astype(np.int64) if "train_labels" in h else None
        self.permuted = self.array("permuted") if "permuted" in h else None
        self.split = None
        if "split" in h:
            split = self.array("split")
            bad = ~np.isin(split, ("train", "test"))
            if np.any(bad):
                i = int(np.flatnonzero(bad)[0])
                raise InputError(f"{p}: 'split' must hold 'train' or 'test', got {str(split[i])!r} at index {i}")
            self.split = split

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
        try:
            with self._zip.open(key + ".npy") as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
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
        arr = arr.reshape(arr.shape[0], -1)
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
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
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
        out: dict[str, Subset] = {}
        for name, (rows, labels) in self._subset_rows().items():
            if rows.size:
                out[name] = Subset(name, rows, labels)
        return out

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
    if path.exists() and not force:
        raise InputError(f"{path}: already exists; pass force=True (CLI: --force) to overwrite")
    if not path.parent.exists():
        raise InputError(f"{path}: directory {path.parent} does not exist")


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, force: bool = True) -> Path:
    """Write data to path via a temporary file in the same directory and os.replace."""
    path = Path(path)
    _atomic_target(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, force: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), force=force)


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InputError(f"{what} name must be a non-empty string without '/', got {name!r}")
    return name


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
        arrays["act/" + _check_name(name, "layer")] = arr
    for layer, tensors in (grads or {}).items():
        for tname, value in tensors.items():
            arrays[f"grad/{_check_name(layer, 'layer')}/{_check_name(tname, 'tensor')}"] = np.asarray(value)
    for key, value in (extra or {}).items():
        if not key.startswith("probe/"):
            raise InputError(f"extra key {key!r} must start with 'probe/'")
        arrays[key] = np.asarray(value)
    for key, arr in arrays.items():
        if arr.dtype.hasobject:
            raise InputError(f"'{key}' has dtype object; save numeric arrays")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        (np.savez_compressed if compress else np.savez)(tmp, **arrays)
        ActivationFile(tmp).close()  # validate what was written before it replaces anything
        if path.exists() and not force:  # re-check: another writer may have appeared meanwhile
            raise InputError(f"{path}: already exists; pass force=True (CLI: --force) to overwrite")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
