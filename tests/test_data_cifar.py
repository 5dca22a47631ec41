"""The official CIFAR-10/100 python archives: real-format tarballs written by the test, the
restricted unpickler against a crafted pickle, and the download path when offline."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch

from tests.data_fixtures import write_cifar10, write_cifar100, write_dir, write_tar
from vitlab.data import load_data
from vitlab.data import cifar
from vitlab.data.cifar import restricted_load


def test_cifar10_archive_and_extracted_folder(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar10(archive, per_batch=6, test=5)
    splits = load_data(archive, val_size=0, cache_dir=tmp_path / "c")
    assert splits.class_names[0] == "airplane" and splits.num_classes == 10
    assert splits.train.images.shape == (30, 3, 32, 32) and splits.test.images.shape == (5, 3, 32, 32)
    data, labels = expected["train"][2]  # data_batch_3 = images 12..17
    assert torch.equal(splits.train.images[12:18], torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert splits.train.labels[12:18].tolist() == labels
    assert splits.test.labels.tolist() == expected["test"][0][1]
    assert "cifar10" in splits.source

    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "extracted", filter="data")  # an extracted copy made by the user
    from_folder = load_data(tmp_path / "extracted", val_size=0.2, cache_dir=tmp_path / "c")
    assert len(from_folder.train) == 24 and len(from_folder.val) == 6
    assert torch.equal(from_folder.test.images, splits.test.images)


def test_cifar100_archive_uses_fine_labels(tmp_path):
    expected = write_cifar100(tmp_path / "cifar-100-python.tar.gz", train=20, test=7)
    splits = load_data(tmp_path / "cifar-100-python.tar.gz", val_size=0, cache_dir=tmp_path / "c")
    assert splits.num_classes == 100 and splits.class_names[7] == "class07"
    assert splits.train.labels.tolist() == expected["train"][1]
    assert torch.equal(splits.test.images, torch.from_numpy(expected["test"][0].reshape(-1, 3, 32, 32)))
    resized = load_data(tmp_path / "cifar-100-python.tar.gz", val_size=0, image_size=16, channels=1,
                        cache_dir=tmp_path / "c")
    assert resized.train.images.shape == (20, 1, 16, 16)


class Exploit:
    """Unpickling this runs os.system: the payload of a crafted archive."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_fails_clearly_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": Exploit(marker), b"labels": [0]}, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load evil: global '(posix|os|nt)\.system' is not allowed"):
        restricted_load(payload, "evil")
    assert not marker.exists()

    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar10(archive)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    files["cifar-10-batches-py/data_batch_2"] = payload
    write_tar(archive, files)
    with pytest.raises(ValueError, match="data_batch_2.*not allowed"):
        load_data(archive, cache_dir=tmp_path / "c")
    assert not marker.exists()
    object_array = pickle.dumps({"data": np.array([print], dtype=object)}, protocol=2)
    with pytest.raises(ValueError, match="refusing"):
        restricted_load(object_array, "objects")


def test_restricted_unpickler_reads_numpy1_batches():
    # the official files were pickled by numpy 1, whose arrays name numpy.core.multiarray
    batch = {"data": np.arange(6, dtype=np.uint8).reshape(1, 6), "labels": [3], "name": b"\xe9t\xe9"}
    written = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in written
    loaded = restricted_load(written, "batch")
    assert loaded["labels"] == [3] and loaded["data"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert loaded["name"] == b"\xe9t\xe9"


def test_missing_batch_is_named(tmp_path):
    archive = tmp_path / "c10.tar.gz"
    write_cifar10(archive)
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    del files["cifar-10-batches-py/test_batch"]
    write_dir(tmp_path / "partial", files)
    with pytest.raises(ValueError, match="lacks test_batch"):
        load_data(tmp_path / "partial", cache_dir=tmp_path / "c")


def test_named_source_offline_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        load_data("cifar10", cache_dir=tmp_path / "cache")
    message = str(error.value)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert str(tmp_path / "cache" / "cifar-10-python.tar.gz") in message


def test_download_is_checksum_verified_then_used_from_the_cache(tmp_path, monkeypatch):
    write_cifar100(tmp_path / "made.tar.gz")
    payload = (tmp_path / "made.tar.gz").read_bytes()
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="has md5 .* expected eb9058c3a382ffc7106e4002c42a8d85"):
        load_data("cifar100", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar-100-python.tar.gz").exists()
    monkeypatch.setitem(cifar.CIFAR["cifar100"], "md5", hashlib.md5(payload).hexdigest())
    splits = load_data("cifar100", val_size=0, cache_dir=tmp_path / "cache")
    assert len(splits.train) == 20 and (tmp_path / "cache" / "cifar-100-python.tar.gz").exists()
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded twice"))
    assert len(load_data("cifar100", val_size=0, cache_dir=tmp_path / "cache").test) == 7
