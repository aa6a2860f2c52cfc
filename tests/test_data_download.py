"""``dartsnas data download``: published checksums, verified before anything is kept; no network needed (the
sources are served as file:// URLs)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from dartsnas.cli import main
from dartsnas.data import download as dl
from dartsnas.errors import UserError


def md5(data: bytes) -> str:
    return "md5:" + hashlib.md5(data).hexdigest()


def serve(monkeypatch, name: str, *urls: str, checksums: tuple[str, ...] | None = None) -> dl.DataSet:
    """Data set ``name`` with its downloads fetched from ``urls`` (and, if given, other archive checksums)."""
    ds = dl.DATASETS[name]
    downloads = tuple(dataclasses.replace(d, url=u, checksum=checksums[i] if checksums else d.checksum)
                      for i, (d, u) in enumerate(zip(ds.downloads, urls, strict=True)))
    served = dataclasses.replace(ds, downloads=downloads)
    monkeypatch.setitem(dl.DATASETS, name, served)
    return served


def fake_cifar_tarball(path: Path, members: dict[str, bytes]) -> bytes:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


@pytest.fixture
def tiny_cifar(monkeypatch, tmp_path: Path) -> Path:
    """A small tarball in the CIFAR-10 layout, and a CIFAR-10 entry whose checksums are its own."""
    members = {name: f"contents of {name}".encode() for name in dl._CIFAR_MEMBERS}
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    blob = fake_cifar_tarball(archive, members)
    ds = dl.DATASETS["cifar10"]
    item = dataclasses.replace(ds.downloads[0], url=archive.as_uri(), checksum=md5(blob),
                               members=tuple(dataclasses.replace(m, checksum=md5(members[m.name.split("/")[1]]))
                                             for m in ds.downloads[0].members))
    monkeypatch.setitem(dl.DATASETS, "cifar10", dataclasses.replace(ds, downloads=(item,)))
    return archive


def test_published_checksums_match_the_exact_copies_of_the_corpora(data_dir: Path):
    for name, folder in (("ptb", "penn"), ("wt2", "wikitext-2")):
        for member in dl.DATASETS[name].members():
            path = data_dir / folder / member.name
            if not path.is_file():
                pytest.skip(f"{path} not found")
            assert dl.matches(path, member.checksum), path
    assert dl.DATASETS["cifar10"].downloads[0].checksum == "md5:c58f30108f718f92721af3b95e74349a"
    for ds in dl.DATASETS.values():
        for item in ds.downloads:
            assert item.url.startswith("https://")
            for checksum in (item.checksum, *(m.checksum for m in item.members)):
                algorithm, _, value = checksum.partition(":")
                assert len(value) == {"md5": 32, "sha256": 64}[algorithm]


def test_ptb_end_to_end_with_the_real_checksums(monkeypatch, ptb_dir: Path, tmp_path: Path, capsys):
    serve(monkeypatch, "ptb", *((ptb_dir / f"{split}.txt").as_uri() for split in ("train", "valid", "test")))
    target = tmp_path / "penn"
    assert main(["data", "download", "ptb", "--dir", str(target)]) == 0
    assert "checksums verified" in capsys.readouterr().out
    assert sorted(p.name for p in target.iterdir()) == ["test.txt", "train.txt", "valid.txt"]
    assert (target / "valid.txt").read_bytes() == (ptb_dir / "valid.txt").read_bytes()

    def no_network(*args):
        raise AssertionError("nothing should be fetched")

    monkeypatch.setattr(dl, "fetch", no_network)
    assert main(["data", "download", "ptb", "--dir", str(target)]) == 0  # verified files are kept, not fetched again
    assert "already in" in capsys.readouterr().out


def test_wt2_archive_members_are_verified_and_renamed(monkeypatch, data_dir: Path, tmp_path: Path):
    source = data_dir / "wikitext-2"
    if not (source / "train.txt").is_file():
        pytest.skip(f"{source} not found")
    archive = tmp_path / "wikitext-2-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:  # the published layout (stored, to stay fast)
        for split in ("train", "valid", "test"):
            z.write(source / f"{split}.txt", f"wikitext-2/wiki.{split}.tokens")
    serve(monkeypatch, "wt2", archive.as_uri(), checksums=(md5(archive.read_bytes()),))
    result = dl.download("wt2", tmp_path / "wt2")
    assert [p.name for p in result.files] == ["train.txt", "valid.txt", "test.txt"]
    assert (tmp_path / "wt2" / "test.txt").read_bytes() == (source / "test.txt").read_bytes()


def test_cifar_tarball_is_extracted_into_the_folder_torchvision_reads(tiny_cifar: Path, tmp_path: Path):
    result = dl.download("cifar10", tmp_path / "cifar")
    assert result.fetched == [tiny_cifar.as_uri()]
    batches = tmp_path / "cifar" / "cifar-10-batches-py"
    assert sorted(p.name for p in batches.iterdir()) == sorted(dl._CIFAR_MEMBERS)
    assert (batches / "test_batch").read_bytes() == b"contents of test_batch"
    assert [p.name for p in (tmp_path / "cifar").iterdir()] == ["cifar-10-batches-py"]  # no temporary files left


def test_a_corrupted_download_is_refused_and_nothing_is_kept(monkeypatch, tiny_cifar: Path, tmp_path: Path, capsys):
    good = tiny_cifar.read_bytes()
    tiny_cifar.write_bytes(good[:-10] + b"0123456789")  # damaged in transit
    target = tmp_path / "cifar"
    assert main(["data", "download", "cifar10", "--dir", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match its published checksum" in err
    assert not target.exists()
    # An archive with the expected checksum but a wrong member: refused too, and an existing folder left as it was.
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    members = {name: b"x" for name in dl._CIFAR_MEMBERS}
    blob = fake_cifar_tarball(tiny_cifar, members)
    item = dl.DATASETS["cifar10"].downloads[0]
    serve(monkeypatch, "cifar10", item.url, checksums=(md5(blob),))
    with pytest.raises(UserError, match="does not match the published CIFAR-10 file"):
        dl.download("cifar10", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_files_that_differ_are_replaced_only_with_force(monkeypatch, ptb_dir: Path, tmp_path: Path, capsys):
    serve(monkeypatch, "ptb", *((ptb_dir / f"{split}.txt").as_uri() for split in ("train", "valid", "test")))
    target = tmp_path / "penn"
    target.mkdir()
    (target / "train.txt").write_text("my own corpus")
    assert main(["data", "download", "ptb", "--dir", str(target)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (target / "train.txt").read_text() == "my own corpus"
    assert main(["data", "download", "ptb", "--dir", str(target), "--force"]) == 0
    assert dl.matches(target / "train.txt", dl.DATASETS["ptb"].members()[0].checksum)


def test_offline_is_one_line(monkeypatch, tmp_path: Path, capsys):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(dl.urllib.request, "urlopen", offline)
    assert main(["data", "download", "wt2", "--dir", str(tmp_path / "wt2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot download https://s3.amazonaws.com" in err and "internet" in err
    assert not (tmp_path / "wt2").exists()
