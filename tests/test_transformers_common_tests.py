"""The fetch step that provides transformers' common model tests: unpacking, stand-ins, and the skip without network."""

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import transformers_common_tests as common


def fake_pip(archive_files: dict[str, str] | None):
    """A `subprocess.run` that plays `pip download`: writes an sdist holding `archive_files`, or fails when None."""

    def run(command, **kwargs):
        if archive_files is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")
        destination = Path(command[command.index("--dest") + 1])
        with tarfile.open(destination / "transformers-0.0.0.tar.gz", "w:gz") as archive:
            for name, text in archive_files.items():
                data = text.encode()
                member = tarfile.TarInfo(f"transformers-0.0.0/{name}")
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_the_sdist_tests_are_unpacked_into_a_package_with_stand_ins(tmp_path, monkeypatch):
    files = {
        "tests/test_modeling_common.py": "from .exporters.test_export import ExportTesterMixin\n",
        "tests/models/vit/test_modeling_vit.py": "",
        "src/transformers/__init__.py": "",
    }
    monkeypatch.setattr(common.subprocess, "run", fake_pip(files))
    root = common._prepare("0.0.0", tmp_path)
    package = root / common.PACKAGE
    assert (package / "test_modeling_common.py").read_text() == files["tests/test_modeling_common.py"]
    assert not (package / "models").exists()  # only the top-level tests/*.py are used
    for relative in common.STAND_INS:
        assert (package / relative).is_file() and (package / relative).parent.joinpath("__init__.py").is_file()
    assert [path.name for path in tmp_path.iterdir()] == ["0.0.0"]  # no staging folder left
    monkeypatch.setattr(common.subprocess, "run", fake_pip(None))
    assert common._prepare("0.0.0", tmp_path) == root  # cached: no second download


def test_without_the_sdist_the_tests_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(common.subprocess, "run", fake_pip(None))
    monkeypatch.setenv(common.CACHE_ENV, str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="could not be fetched: .*No matching distribution found"):
        common.import_common_tests()
    assert [path.name for path in tmp_path.iterdir()] == []
