"""Fashion-MNIST: IDX reading, the search order for the files, and the subset shipped in the package."""

import gzip
import hashlib
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from cropr.data import fashion_mnist
from cropr.data.fashion_mnist import IDX_FILES, IDXFormatError, find_fashion_mnist_dir, load_fashion_mnist, read_idx

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_fashion_mnist_subset.py"


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(directory: Path, train_value: int = 200, test_value: int = 100) -> Path:
    """Two images per class in train and one in test, squares of a constant value telling the splits apart."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, per_class, value in (("train", 2, train_value), ("test", 1, test_value)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
        images[:, 4:24, 4:24] = value
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for role, name in IDX_FILES.items():
        (directory / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(arrays[role])))
    return directory


@pytest.fixture
def isolated_search(tmp_path, monkeypatch):
    """No environment variable, and the cwd, repository and system locations all point at empty places."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    workdir = tmp_path / "work" / "checkout"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(fashion_mnist, "REPO_ROOT", tmp_path / "repo" / "checkout")
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DATA_DIR", tmp_path / "system")
    return tmp_path


def test_full_files_known_counts(shared_data):
    directory = shared_data / "fashion-mnist"
    if not fashion_mnist.has_fashion_mnist_files(directory):
        pytest.skip(f"{directory} lacks the Fashion-MNIST IDX files")
    data = load_fashion_mnist(directory)
    assert data.origin == "argument" and not data.is_subset
    assert data.train_images.shape == (60000, 28, 28) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (10000, 28, 28) and data.test_labels.shape == (10000,)
    # Fashion-MNIST is exactly balanced: 6,000 training and 1,000 test images per class.
    assert np.bincount(data.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10
    assert not data.train_images.flags.writeable


def test_read_idx_gzip_and_plain_agree(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "plain"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "packed.gz", expected_ndim=3), array)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x00\x00\x08", "too short"),
        (b"\x00\x01\x08\x01" + (2).to_bytes(4, "big") + b"\x00\x00", "magic"),
        (b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x00\x00", "5 bytes of data"),
        (b"\x00\x00\x08\x02" + (1).to_bytes(4, "big"), "truncated IDX header"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt gzip"),
    ],
)
def test_corrupt_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(content)
    with pytest.raises(IDXFormatError, match=message) as error:
        read_idx(path)
    assert str(path) in str(error.value)


def test_wrong_dimensions_are_reported(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(IDXFormatError, match="1 dimensions, expected 3"):
        read_idx(path, expected_ndim=3)


def test_images_and_labels_must_match(isolated_search):
    directory = write_fake_fashion_mnist(isolated_search / "mismatched")
    (directory / f"{IDX_FILES['test_labels']}.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(IDXFormatError, match="10 images but .* 3 labels"):
        load_fashion_mnist(directory)


def test_explicit_path_wins_over_env(isolated_search, monkeypatch):
    explicit = write_fake_fashion_mnist(isolated_search / "explicit")
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(write_fake_fashion_mnist(isolated_search / "env")))
    data = load_fashion_mnist(explicit)
    assert (data.origin, data.source) == ("argument", str(explicit))
    assert data.train_images.shape == (20, 28, 28)


def test_env_wins_over_default_locations(isolated_search, monkeypatch):
    write_fake_fashion_mnist(isolated_search / "work" / "shared" / "data" / "fashion-mnist")
    env_dir = write_fake_fashion_mnist(isolated_search / "env")
    monkeypatch.setenv(fashion_mnist.ENV_VAR, str(env_dir))
    assert find_fashion_mnist_dir() == ("env", env_dir)


def test_default_locations_in_order(isolated_search):
    system = write_fake_fashion_mnist(isolated_search / "system")
    assert find_fashion_mnist_dir() == ("system", system)
    repo = write_fake_fashion_mnist(isolated_search / "repo" / "shared" / "data" / "fashion-mnist")
    assert find_fashion_mnist_dir() == ("repo", repo)
    write_fake_fashion_mnist(isolated_search / "work" / "shared" / "data" / "fashion-mnist")
    origin, directory = find_fashion_mnist_dir()
    assert origin == "cwd" and directory.resolve() == (isolated_search / "work" / "shared" / "data" / "fashion-mnist")


@pytest.mark.parametrize("use_env", [False, True])
def test_explicit_location_without_files_is_an_error(isolated_search, monkeypatch, use_env):
    empty = isolated_search / "empty"
    empty.mkdir()
    if use_env:
        monkeypatch.setenv(fashion_mnist.ENV_VAR, str(empty))
    with pytest.raises(FileNotFoundError, match=fashion_mnist.ENV_VAR if use_env else "path"):
        load_fashion_mnist(None if use_env else empty)


def test_subset_is_the_last_resort(isolated_search):
    assert find_fashion_mnist_dir() is None
    data = load_fashion_mnist()
    assert data.origin == "subset" and data.is_subset and data.source == str(fashion_mnist.SUBSET_PATH)
    assert np.bincount(data.train_labels, minlength=10).tolist() == [600] * 10
    assert np.bincount(data.test_labels, minlength=10).tolist() == [100] * 10
    assert data.train_images.shape == (6000, 28, 28) and data.test_images.shape == (1000, 28, 28)
    assert load_fashion_mnist("subset").origin == "subset"


def test_subset_splits_do_not_overlap():
    with np.load(fashion_mnist.SUBSET_PATH) as archive:
        train, test = archive["train_images"], archive["test_images"]
        train_indices, test_indices = archive["train_indices"], archive["test_indices"]
    train_hashes = {hashlib.sha1(image.tobytes()).digest() for image in train}
    assert len(train_hashes) == len(train)
    assert not any(hashlib.sha1(image.tobytes()).digest() in train_hashes for image in test)
    assert len(set(train_indices.tolist())) == 6000 and train_indices.max() < 60000
    assert len(set(test_indices.tolist())) == 1000 and test_indices.max() < 10000


def test_subset_matches_the_original_files_and_regenerates(shared_data, tmp_path, monkeypatch):
    directory = shared_data / "fashion-mnist"
    if not fashion_mnist.has_fashion_mnist_files(directory):
        pytest.skip(f"{directory} lacks the Fashion-MNIST IDX files")
    output = tmp_path / "subset.npz"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--source", str(directory), "--output", str(output)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    full = load_fashion_mnist(directory)
    with np.load(fashion_mnist.SUBSET_PATH) as committed, np.load(output) as regenerated:
        for key in committed.files:
            np.testing.assert_array_equal(committed[key], regenerated[key], err_msg=key)
        # Training images come from the original training file, test images from the original test file.
        np.testing.assert_array_equal(committed["train_images"], full.train_images[committed["train_indices"]])
        np.testing.assert_array_equal(committed["test_images"], full.test_images[committed["test_indices"]])
        np.testing.assert_array_equal(committed["test_labels"], full.test_labels[committed["test_indices"]])
