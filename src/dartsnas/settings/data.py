"""Settings of ``dartsnas data download``."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option


@dataclass
class DownloadConfig:
    """Settings of ``dartsnas data download cifar10|ptb|wt2``; the data set is the positional argument."""

    dir: str | None = option(None, "folder to put the data set in (default: where the commands look without --data: "
                                   "$XDG_CACHE_HOME or ~/.cache /dartsnas/cifar10, data/penn, data/wikitext-2)", group="data")
    force: bool = option(False, "replace files in the folder that differ from the published ones", group="data")
    timeout: float = option(60.0, "seconds to wait for the server before giving up", group="data")
