"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`), fetched for the installed version.

transformers holds every model family to the mixins of its `tests/test_modeling_common.py` and
`tests/test_configuration_common.py`. Those files ship in its source distribution (sdist) only, not in the wheel pip
installs, so [`import_common_tests`] fetches them once per transformers version:

1. `pip download --no-binary :all: --no-deps transformers==<installed version>` (PyPI, through pip) into a temporary
   folder;
2. the top-level `tests/*.py` of the archive are unpacked into the package `transformers_tests` under
   `.cache/transformers-tests/<version>/` at the repository root (gitignored; the environment variable
   `CROPR_TRANSFORMERS_TESTS_CACHE` names another folder, e.g. one prepared on a machine without network);
3. the sdist leaves out three modules that those files import; [`STAND_INS`] writes minimal stand-ins for them.

When the files cannot be fetched (no network, no pip), the tests that need them are skipped with the reason.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import transformers

PACKAGE = "transformers_tests"
CACHE_ENV = "CROPR_TRANSFORMERS_TESTS_CACHE"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "transformers-tests"

# Stand-ins for modules of transformers' repository that `test_modeling_common.py` and `test_configuration_common.py`
# import but its sdist does not contain. Each provides only the name imported, with what CroprViT's tests need of it.
STAND_INS = {
    "exporters/test_export.py": '''
class ExportTesterMixin:
    """Stand-in (absent from transformers' sdist): the base of `ModelTesterMixin` holding the `torch.export` tests.
    CroprViT's export is tested by the project itself (tests/tools/test_export.py)."""
''',
    "generation/test_utils.py": '''
class GenerationTesterMixin:
    """Stand-in (absent from transformers' sdist): the mixin of generative models' tests. CroprViT does not generate;
    `ModelTesterMixin` only checks that a model that cannot generate does not inherit it."""
''',
    "utils/test_configuration_utils.py": '''
"""Stand-in (absent from transformers' sdist) for the module defining `config_common_kwargs`: a non-default value
for each common `PreTrainedConfig` argument, which `ConfigTester` checks every config class stores."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
''',
}


def _download_sdist_tests(version: str, target: Path) -> None:
    """Download transformers' sdist of `version` with pip and unpack its top-level `tests/*.py` into `target`."""
    with tempfile.TemporaryDirectory() as download_dir:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps"]
        command += ["--dest", download_dir, f"transformers=={version}"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = sorted(Path(download_dir).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise OSError(f"`{' '.join(command[2:])}` failed: {reason[0]}")
        with tarfile.open(archives[0]) as archive:
            members = [
                member
                for member in archive.getmembers()
                if member.isfile() and len(Path(member.name).parts) == 3 and Path(member.name).parts[1] == "tests"
            ]
            if not any(Path(member.name).name == "test_modeling_common.py" for member in members):
                raise OSError(f"{archives[0].name} holds no tests/test_modeling_common.py")
            for member in members:
                extracted = archive.extractfile(member)
                (target / Path(member.name).name).write_bytes(extracted.read())


def _prepare(version: str, cache: Path) -> Path:
    """The folder holding the package `transformers_tests` for `version`, fetched and completed on first use."""
    root = cache / version
    if (root / PACKAGE / "test_modeling_common.py").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    # Unpacked next to the final folder and renamed into place: an interrupted fetch leaves no half-filled package.
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache))
    try:
        package = staging / PACKAGE
        package.mkdir()
        _download_sdist_tests(version, package)
        docstring = f'"""transformers {version} tests/*.py from its sdist, plus stand-ins."""\n'
        (package / "__init__.py").write_text(docstring)
        for relative, source in STAND_INS.items():
            path = package / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.parent / "__init__.py").touch()
            path.write_text(source.lstrip())
        staging.rename(root)
    except OSError:
        if not (root / PACKAGE / "test_modeling_common.py").is_file():  # else another process unpacked them first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def import_common_tests() -> tuple[ModuleType, ModuleType]:
    """`(test_modeling_common, test_configuration_common)` of the installed transformers version.

    Skips the calling test module when they cannot be fetched.
    """
    version = transformers.__version__
    cache = Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))
    try:
        root = _prepare(version, cache)
    except (OSError, subprocess.SubprocessError, tarfile.TarError) as error:
        reason = f"transformers {version}'s common model tests could not be fetched: {error}"
        pytest.skip(reason, allow_module_level=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return (
        importlib.import_module(f"{PACKAGE}.test_modeling_common"),
        importlib.import_module(f"{PACKAGE}.test_configuration_common"),
    )
