"""What a person reads after a run: a text log, a CSV of metrics per epoch, optional TensorBoard."""

from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

LOGGER_NAME = "sqakd"


class _TqdmHandler(logging.Handler):
    """Console handler that prints through tqdm so that progress bars stay intact."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record))


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def setup_console_logging(level: int = logging.INFO) -> logging.Logger:
    logger = get_logger()
    logger.setLevel(level)
    if not any(isinstance(h, _TqdmHandler) for h in logger.handlers):
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.propagate = False
    return logger


class _Held(logging.Handler):
    """Keeps records until the run folder exists (``RunLog(defer=True)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunLog:
    """Writes ``train.log`` and ``metrics.csv`` into the run folder (and TensorBoard events).

    With ``defer=True`` nothing is written (and the folder is not created) until :meth:`open`:
    messages logged before are held and written to ``train.log`` then, so that a run that fails
    while it is being set up leaves no folder behind."""

    def __init__(
        self, folder: Path, tensorboard: bool = False, enabled: bool = True, defer: bool = False
    ) -> None:
        self.folder = folder
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.logger = setup_console_logging()
        self._file_handler: logging.Handler | None = None
        self._held: _Held | None = None
        self._writer = None
        if not enabled:
            return
        if defer:
            self._held = _Held()
            self.logger.addHandler(self._held)
        else:
            self.open()

    def open(self) -> None:
        """Create the folder, start ``train.log`` (with any held messages) and TensorBoard."""
        if not self.enabled or self._file_handler is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self._file_handler = logging.FileHandler(self.folder / "train.log")
        self._file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        if self._held is not None:
            self.logger.removeHandler(self._held)
            for record in self._held.records:
                self._file_handler.handle(record)
            self._held = None
        self.logger.addHandler(self._file_handler)
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.logger.warning(
                    "TensorBoard is not installed (pip install tensorboard); writing CSV only"
                )
            else:
                self._writer = SummaryWriter(str(self.folder / "tensorboard"))

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    @contextlib.contextmanager
    def capture_warnings(self) -> Iterator[None]:
        """Python warnings raised inside (``prepare``'s, ``calibrate``'s) become WARNING lines of
        this log, on the console and in ``train.log``, instead of stderr's file:line form."""
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            try:
                yield
            finally:
                for item in seen:
                    self.logger.warning("%s", item.message)

    def metrics(self, row: dict[str, Any], step: int) -> None:
        """Append one row to metrics.csv (header from the first row) and to TensorBoard."""
        if not self.enabled:
            return
        self._append_csv(self.folder / "metrics.csv", row)
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.csv by ``rows`` (on resume: the checkpoint's history, so that epochs
        logged after the checkpoint but lost with the crash are not listed twice)."""
        if not self.enabled:
            return
        path = self.folder / "metrics.csv"
        path.unlink(missing_ok=True)
        if rows:
            self._write_csv(path, [dict(row) for row in rows])

    def _append_csv(self, path: Path, row: dict[str, Any]) -> None:
        """One more row; when it brings a column the file lacks (a phase that logs other losses),
        the file is rewritten with every column, so that no value lands under another's name."""
        earlier: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="") as stream:
                reader = csv.DictReader(stream)
                header = list(reader.fieldnames or [])
                if set(row) <= set(header):
                    with path.open("a", newline="") as appending:
                        csv.DictWriter(appending, fieldnames=header, restval="").writerow(row)
                    return
                earlier = list(reader)
        self._write_csv(path, [*earlier, row])

    @staticmethod
    def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        if self._held is not None:
            self.logger.removeHandler(self._held)
            self._held = None
        if self._file_handler is not None:
            self.logger.removeHandler(self._file_handler)
            self._file_handler.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(folder: Path) -> list[dict[str, str]]:
    path = folder / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as stream:
        return list(csv.DictReader(stream))
