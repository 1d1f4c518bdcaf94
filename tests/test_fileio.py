"""replace_directory: a directory is swapped in whole or not at all."""

import os

import pytest

from topd_jax.fileio import replace_directory


def test_creates_a_missing_directory(tmp_path):
    with replace_directory(tmp_path / "out", replaced=lambda name: True) as staging:
        with open(os.path.join(staging, "a.txt"), "w") as f:
            f.write("new")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert os.listdir(tmp_path) == ["out"]


def test_replaces_chosen_files_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    (out / "stale").write_text("old")
    (out / "notes").write_text("mine")
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.json").write_text("{}")
    with replace_directory(out, replaced=lambda name: name in ("weights", "stale")) as staging:
        with open(os.path.join(staging, "weights"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(out)) == ["notes", "tokenizer", "weights"]
    assert (out / "weights").read_text() == "new" and (out / "notes").read_text() == "mine"
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}"
    assert os.listdir(tmp_path) == ["out"]


def test_an_error_inside_leaves_the_directory_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with replace_directory(out, replaced=lambda name: True) as staging:
            with open(os.path.join(staging, "weights"), "w") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert (out / "weights").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


def test_refuses_to_replace_a_file_before_any_work(tmp_path):
    (tmp_path / "out").write_text("a file")
    ran = []
    with pytest.raises(FileExistsError, match="is not a directory"):
        with replace_directory(tmp_path / "out", replaced=lambda name: True):
            ran.append(True)
    assert not ran and (tmp_path / "out").read_text() == "a file"
    assert os.listdir(tmp_path) == ["out"]


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    """The two-rename fallback (file systems without renameat2's exchange): a failed second
    rename puts the old version back."""
    from topd_jax import fileio

    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if ".saving-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        with replace_directory(out, replaced=lambda name: True) as staging:
            with open(os.path.join(staging, "weights"), "w") as f:
                f.write("new")
    assert (out / "weights").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_a_new_directory_follows_the_umask_and_an_existing_one_keeps_its_mode(tmp_path, umask_027):
    from topd_jax.fileio import umask

    assert umask() == 0o027
    with replace_directory(tmp_path / "new", replaced=lambda name: True):
        pass
    assert _mode(tmp_path / "new") == 0o750  # not mkdtemp's 0700
    (tmp_path / "old").mkdir()
    os.chmod(tmp_path / "old", 0o755)
    with replace_directory(tmp_path / "old", replaced=lambda name: True):
        pass
    assert _mode(tmp_path / "old") == 0o755


def test_write_file_is_atomic_and_gives_the_mode_open_would(tmp_path, umask_027):
    from topd_jax.fileio import write_file

    target = tmp_path / "sub" / "config.yaml"
    write_file(target, "a: 1\n")
    assert target.read_text() == "a: 1\n" and _mode(target) == 0o640  # not mkstemp's 0600
    os.chmod(target, 0o604)
    write_file(target, b"a: 2\n")
    assert target.read_text() == "a: 2\n" and _mode(target) == 0o604
    assert os.listdir(target.parent) == ["config.yaml"]  # no temporary left behind
