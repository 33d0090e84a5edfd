"""Streaming writer of activations files: append batches, finalise atomically. No torch, no math.

:class:`ActivationWriter` writes the same format as :func:`geomprobe.io.save_activations` (version 1,
docs/format.md) without holding the whole data set in memory: each appended batch goes straight to
one spool file per key in a hidden folder next to the target; :meth:`ActivationWriter.close` wraps
the spooled arrays into a temporary ``.npz`` (a zip of ``.npy`` members, copied in bounded chunks),
validates it with :class:`geomprobe.io.ActivationFile` and renames it over the target. Peak memory is
one batch plus the copy buffer; peak disk is about twice the file while it is finalised.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ._validation import InputError
from .io import FORMAT_NAME, FORMAT_VERSION, ActivationFile

__all__ = ["ActivationWriter"]

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_COPY_CHUNK = 1 << 20  # bytes copied at a time from a spool file into the archive


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise InputError(f"{what} name must be a non-empty string without '/' not starting with '.', got {name!r}")
    return name


class _Spool:
    """One key's rows: appended raw (C order) to a file; shape per row and dtype fixed by the first batch.
    The file is opened per append (no descriptor held: a model may have thousands of layers)."""

    def __init__(self, folder: Path, index: int, row_shape: tuple[int, ...], dtype: np.dtype):
        self.file = folder / f"{index}.raw"
        self.file.touch()
        self.row_shape = row_shape
        self.dtype = dtype
        self.rows = 0

    def append(self, arr: np.ndarray) -> None:
        with open(self.file, "ab") as fh:
            np.ascontiguousarray(arr, dtype=self.dtype).tofile(fh)
        self.rows += arr.shape[0]


class ActivationWriter:
    """Write an activations file batch by batch (``append``), then atomically (``close``).

    ``path``: the target ``.npz``; it must not exist unless ``force`` (checked at once, and again just
    before the rename). ``meta``: a JSON-able dict stored with the format name and version (more can
    be given to ``close``). ``compress``: deflate the members (smaller, slower; uncompressed members
    can be memory-mapped by the readers). Used as a context manager, the file is finalised when the
    block ends normally and nothing is left behind (no target, no temporary) when it raises.

    Every batch gives ``labels`` (n_b,) and the same layers, each (n_b, ...) with the same shape per
    row as in the first batch; ``train_labels``, ``permuted`` and ``split`` (each (n_b,)) are given
    in every batch or in none. A float16/32/64 layer keeps its dtype (the first batch's); any other
    dtype is stored as float32. Errors are :class:`geomprobe.InputError` naming the target file, the
    batch, the key and the values, raised before the batch is written.
    """

    def __init__(self, path: str | os.PathLike, *, meta: Mapping[str, Any] | None = None, force: bool = False,
                 compress: bool = False):
        self.path = Path(path)
        self.force = bool(force)
        self.compress = bool(compress)
        self._check_target()
        self._meta = self._check_meta(meta)
        self._folder = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".partial",
                                             dir=self.path.parent))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._spools: dict[str, _Spool] = {}
        self._optional: tuple[str, ...] | None = None  # which of train_labels/permuted/split batches carry
        self._keys: tuple[str, ...] | None = None  # act/ and grad/ keys of the first batch
        self.n = 0
        self.n_batches = 0
        self.closed = False

    # -- checks ------------------------------------------------------------------------------------
    def _check_target(self) -> None:
        p = self.path
        if p.exists() and (p.is_dir() or not self.force):
            what = "is a directory" if p.is_dir() else "already exists; pass force=True (CLI: --force) to overwrite"
            raise InputError(f"{p}: {what}")
        if not p.parent.is_dir():
            raise InputError(f"{p}: directory {p.parent} does not exist")

    def _check_meta(self, meta: Mapping[str, Any] | None) -> dict[str, Any]:
        info = dict(meta or {})
        try:
            json.dumps(info)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: meta must be JSON-serialisable: {exc}") from None
        return info

    def _fail(self, msg: str) -> InputError:
        return InputError(f"{self.path}: batch {self.n_batches}: {msg}")

    @property
    def layers(self) -> list[str]:
        """Layer names in file order (known after the first batch)."""
        return [k[4:] for k in (self._keys or ()) if k.startswith("act/")]

    # -- appending ---------------------------------------------------------------------------------
    def append(self, labels: Any, activations: Mapping[str, Any], *, train_labels: Any = None, permuted: Any = None,
               split: Any = None, grads: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Append one batch of examples (validated first; nothing is written when a check fails)."""
        if self.closed:
            raise InputError(f"{self.path}: the writer is closed; no more batches can be appended")
        lab = np.asarray(labels)
        if lab.ndim != 1 or (lab.size and lab.dtype.kind not in "iub"):
            raise self._fail(f"labels must be a 1-D integer array, got dtype {lab.dtype} shape {lab.shape}")
        nb = lab.shape[0]
        arrays: dict[str, np.ndarray] = {"labels": lab.astype(np.int64)}
        opt = {"train_labels": train_labels, "permuted": permuted, "split": split}
        given = tuple(k for k, v in opt.items() if v is not None)
        if self._optional is not None and given != self._optional:
            raise self._fail(f"gives {', '.join(given) or 'none'} of train_labels/permuted/split but the first "
                             f"batch gave {', '.join(self._optional) or 'none'}")
        for k in given:
            a = np.asarray(opt[k])
            if a.shape != (nb,):
                raise self._fail(f"{k} has shape {a.shape} but the batch has {nb} labels")
            if k == "train_labels":
                if a.size and a.dtype.kind not in "iub":
                    raise self._fail(f"train_labels must be integers, got dtype {a.dtype}")
                a = a.astype(np.int64)
            elif k == "permuted":
                if a.size and a.dtype.kind != "b":
                    raise self._fail(f"permuted must be bool, got dtype {a.dtype}")
            else:
                bad = ~np.isin(a.astype(str), ("train", "test"))
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    raise self._fail(f"split must hold 'train' or 'test', got {str(a[i])!r} at batch row {i}")
                a = a.astype("<U5")
            arrays[k] = a
        if not activations and not grads:
            raise self._fail("no activations or gradients given")
        for name, value in activations.items():
            arrays["act/" + _check_name(name, "layer")] = self._rows(f"layer '{name}'", value, nb)
        for layer, tensors in (grads or {}).items():
            for tname, value in tensors.items():
                key = f"grad/{_check_name(layer, 'layer')}/{_check_name(tname, 'tensor')}"
                arrays[key] = self._rows(f"gradient '{layer}/{tname}'", value, nb)
        keys = tuple(k for k in arrays if k.startswith(("act/", "grad/")))
        if self._keys is not None and keys != self._keys:
            missing = [k for k in self._keys if k not in keys]
            extra = [k for k in keys if k not in self._keys]
            raise self._fail(
                "keys differ from the first batch's"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; new {', '.join(extra)}" if extra else "")
                + ("; same keys in another order" if not missing and not extra else "")
            )
        for k, a in arrays.items():
            sp = self._spools.get(k)
            if sp is not None and tuple(a.shape[1:]) != sp.row_shape:
                raise self._fail(f"'{k}' has {tuple(a.shape[1:])} values per row but the first batch had "
                                 f"{sp.row_shape}")
        # all checks passed: write
        self._optional, self._keys = given, keys
        for k, a in arrays.items():
            sp = self._spools.get(k)
            if sp is None:
                sp = self._spools[k] = _Spool(self._folder, len(self._spools), tuple(a.shape[1:]), a.dtype)
            sp.append(a)
        self.n += nb
        self.n_batches += 1

    def _rows(self, what: str, value: Any, nb: int) -> np.ndarray:
        a = np.asarray(value)
        if a.ndim < 2:
            raise self._fail(f"{what} must be (n, features...), got shape {a.shape}")
        if a.shape[0] != nb:
            raise self._fail(f"{what} has {a.shape[0]} rows but the batch has {nb} labels")
        if a.dtype not in _FLOATS:
            if a.dtype.kind not in "iubf":
                raise self._fail(f"{what} must be numeric, got dtype {a.dtype}")
            a = a.astype(np.float32)
        return a

    # -- finalising --------------------------------------------------------------------------------
    def close(self, *, meta: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the file: spooled arrays + ``extra`` (``probe/...`` keys) + meta, validated, then renamed
        over the target. Returns the target path."""
        if self.closed:
            raise InputError(f"{self.path}: the writer is already closed")
        if self.n == 0:
            self.abort()
            raise InputError(f"{self.path}: no examples were appended; nothing to write")
        info = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        info.update(self._meta)
        info.update(self._check_meta(meta))
        info["format"], info["format_version"] = FORMAT_NAME, FORMAT_VERSION
        small: dict[str, np.ndarray] = {"meta": np.array(json.dumps(info))}
        for key, value in (extra or {}).items():
            if not isinstance(key, str) or not key.startswith("probe/"):
                self.abort()
                raise InputError(f"{self.path}: extra key {key!r} must start with 'probe/'")
            small[key] = np.asarray(value)
            if small[key].dtype.hasobject:
                self.abort()
                raise InputError(f"{self.path}: extra key {key!r} has dtype object; save numeric arrays")
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp.npz", dir=self.path.parent)
        os.close(fd)
        try:
            method = zipfile.ZIP_DEFLATED if self.compress else zipfile.ZIP_STORED
            with zipfile.ZipFile(tmp, "w", compression=method, allowZip64=True) as zf:
                order = ["labels"] + [k for k in ("train_labels", "permuted", "split") if k in self._spools]
                order += [k for k in self._keys or () if k.startswith("act/")]
                order += [k for k in self._keys or () if k.startswith("grad/")]
                for key in order:
                    self._copy_member(zf, key, self._spools[key])
                for key, arr in small.items():
                    with zf.open(key + ".npy", "w", force_zip64=arr.nbytes > (1 << 30)) as out:
                        np.lib.format.write_array(out, arr, allow_pickle=False)
            os.chmod(tmp, 0o666 & ~_umask())
            try:
                ActivationFile(tmp).close()  # headers and structure of what was written
            except InputError as exc:
                raise InputError(str(exc).replace(str(tmp), str(self.path))) from None
            if self.path.exists() and not self.force:  # another writer may have appeared meanwhile
                raise InputError(f"{self.path}: already exists; pass force=True (CLI: --force) to overwrite")
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            self.abort()
            raise
        self.abort()  # removes the spool folder
        return self.path

    def _copy_member(self, zf: zipfile.ZipFile, key: str, sp: _Spool) -> None:
        shape = (sp.rows,) + sp.row_shape
        header = {"descr": np.lib.format.dtype_to_descr(sp.dtype), "fortran_order": False, "shape": shape}
        size = sp.rows * int(np.prod(sp.row_shape, dtype=np.int64)) * sp.dtype.itemsize
        with zf.open(key + ".npy", "w", force_zip64=size > (1 << 30)) as out:
            np.lib.format.write_array_header_1_0(out, header)
            with open(sp.file, "rb") as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
        os.unlink(sp.file)  # free disk as soon as the member is in the archive

    def abort(self) -> None:
        """Drop everything written so far (the spool folder); the target is left untouched."""
        self.closed = True
        self._cleanup()

    def __enter__(self) -> ActivationWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.closed:
            return
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __repr__(self) -> str:
        return f"ActivationWriter({str(self.path)!r}, n={self.n}, layers={self.layers})"
