"""The numba cache folder: numba's own choice stands when it is writable; otherwise a per-user folder
of the temporary directory is used, so `import geomprobe` works on a read-only install and home."""
import numba

import geomprobe._kernels as K


def test_numba_choice_stands_when_writable(monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(K, "_writable", lambda folder: True)
    assert K.ensure_cache_dir() is None
    assert numba.config.CACHE_DIR == ""


def test_user_cache_dir_used_when_the_install_is_read_only(monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(K, "_writable", lambda folder: "__pycache__" not in folder)
    assert K.ensure_cache_dir() is None
    assert numba.config.CACHE_DIR == ""


def test_fallback_when_nothing_is_writable(monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(K, "_writable", lambda folder: False)
    assert K.ensure_cache_dir() == K.fallback_cache_dir()
    assert numba.config.CACHE_DIR == K.fallback_cache_dir()


def test_user_setting_is_kept(monkeypatch, tmp_path):
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "_writable", lambda folder: False)
    assert K.ensure_cache_dir() is None
    assert numba.config.CACHE_DIR == str(tmp_path)


def test_writable_probe(tmp_path):
    assert K._writable(str(tmp_path / "new"))
    (tmp_path / "file").write_text("x")
    assert not K._writable(str(tmp_path / "file" / "sub"))
