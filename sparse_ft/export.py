"""Export: merge a trained delta into its base model and write a plain Hugging Face checkpoint.

Streaming: the base checkpoint is read one tensor at a time, shard by shard, and each merged tensor
is written straight into its output shard (of at most ``max_shard_size``, laid out in advance from
the base's headers); peak memory is about the largest tensor plus the delta, whatever the model's
size. Tensors the delta does not change and whose dtype stays are not read at all: their bytes
are copied file to file by the kernel (``copy_file_range``), whole runs at a time. Nothing is built
on a GPU and no DeepSpeed is needed: a ZeRO-3 run's checkpoint already holds the gathered compact delta.

Bases stored as GGUF (or without safetensors/bin weights) are exported in memory instead: loaded by
transformers, merged with :func:`sparse_ft.merge`, written with ``save_pretrained``.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import os
import queue
import re
import shutil
import threading
from pathlib import Path

import torch

from .api import merge
from .delta import FINGERPRINT_RTOL, _sample_positions, load_delta, read_delta
from .errors import ConfigError
from .methods import config_from_dict
from .model_card import write_model_card
from .quant import roundtrip
from .training.checkpoint import read_latest

logger = logging.getLogger("sparse_ft")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> bytes (decimal units, as transformers uses)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise ConfigError(f"--max-shard-size {text!r}; allowed: a size such as 500MB or 5GB")
    unit = (m.group(2) or "B").replace("IB", "B")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


def find_delta(source: str | os.PathLike) -> Path:
    """The delta file behind ``source``: a delta file, a checkpoint directory, or a run's output
    directory (its final ``delta.safetensors``, else its newest checkpoint)."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise ConfigError(f"--checkpoint {source} does not exist")
    if (source / "delta.safetensors").is_file():
        return source / "delta.safetensors"
    latest = read_latest(source / "checkpoints") or read_latest(source)
    if latest is not None and (latest / "delta.safetensors").is_file():
        return latest / "delta.safetensors"
    raise ConfigError(f"--checkpoint {source}: no delta.safetensors there, nor a complete checkpoint holding one")


def resolve_base_dir(base: str) -> Path:
    path = Path(base).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.tiktoken", "*.py"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means the same to the user
        raise ConfigError(f"base model {base!r} is not a local directory and could not be fetched from the hub "
                          f"({type(e).__name__}); pass --base-model DIR") from None


def base_weight_files(base_dir: Path) -> list[Path]:
    """The base's weight shards in order: safetensors (index or single file), else PyTorch .bin."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = base_dir / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [base_dir / f for f in files]
        if (base_dir / single).is_file():
            return [base_dir / single]
    return []


# safetensors' dtype names (its file format spec); the header is JSON, the data raw little-endian.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class _ShardReader:
    """Iterate (key, tensor) of a safetensors or .bin shard, one tensor in memory at a time
    (safetensors; a .bin shard is loaded whole, memory-mapped where torch can)."""

    def __init__(self, path: Path):
        self.path = path
        self.spans: dict[str, tuple[int, int]] = {}
        """Each tensor's bytes in a safetensors shard (absolute file offsets), filled by ``specs``."""

    def specs(self) -> list[tuple[str, list[int], torch.dtype]]:
        """(key, shape, dtype) of every tensor, in file order, read from the header only."""
        if self.path.suffix == ".safetensors":
            entries, data_start = self._safetensors_header()
            self.spans = {key: (data_start + b, data_start + e) for key, _, _, (b, e) in entries}
            return [(key, shape, dtype) for key, shape, dtype, _ in entries]
        state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        return [(key, list(t.shape), t.dtype) for key, t in state.items()]

    def _safetensors_header(self):
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        entries = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _ST_NAMES:
                raise ConfigError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which export does not handle")
            entries.append((key, list(info["shape"]), _ST_NAMES[info["dtype"]], info["data_offsets"]))
        entries.sort(key=lambda e: e[3][0])  # file order: one sequential pass over the shard
        return entries, 8 + n

    def items(self, only: set[str] | None = None):
        """(key, tensor) in file order; with ``only``, just those keys of a safetensors shard (the
        others are not read at all)."""
        if self.path.suffix == ".safetensors":
            # Plain reads into a fresh tensor, not a memory map: the shard's pages then stay in the
            # page cache instead of this process's resident memory.
            entries, data_start = self._safetensors_header()
            with open(self.path, "rb", buffering=0) as f:
                for key, shape, dtype, (begin, end) in entries:
                    if only is not None and key not in only:
                        continue
                    tensor = torch.empty(shape, dtype=dtype)
                    if end > begin:
                        f.seek(data_start + begin)
                        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                        got = 0
                        while got < end - begin:
                            n = f.readinto(view[got:])
                            if not n:
                                raise ConfigError(f"{self.path} is truncated at tensor {key}")
                            got += n
                    yield key, tensor
        else:
            state = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            for key in list(state):
                yield key, state.pop(key)


class _ShardWriter:
    """Writes numbered safetensors shards of at most ``limit`` bytes (a tensor larger than the limit
    gets a shard of its own) and the HF index at the end.

    The whole layout is planned up front from the base's headers (merging changes no shape), so
    each shard's header is written first and every tensor goes to disk as soon as it is merged:
    peak memory is one tensor, not one output shard.
    """

    def __init__(self, out_dir: Path, limit: int, specs: list[tuple[str, list[int], torch.dtype]]):
        self.out_dir = out_dir
        self.shards: list[list[tuple[str, list[int], torch.dtype]]] = []
        size, self.total_bytes = 0, 0
        for key, shape, dtype in specs:
            nbytes = _nbytes(shape, dtype)
            if not self.shards or (self.shards[-1] and size + nbytes > limit):
                self.shards.append([])
                size = 0
            self.shards[-1].append((key, shape, dtype))
            size += nbytes
            self.total_bytes += nbytes
        self._shard, self._pos, self._file = -1, 0, None
        self._run: list | None = None  # pending byte copy [src_fd, begin, end, error message]
        self._copier = _ByteCopier()

    def _open_next(self) -> None:
        self._flush_run()
        if self._file is not None:
            self._file.close()
        self._shard += 1
        self._pos = 0
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, shape, dtype in self.shards[self._shard]:
            end = offset + _nbytes(shape, dtype)
            header[key] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, end]}
            offset = end
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors itself does
        # Unbuffered: tensor bytes and kernel copies go to the same file descriptor, in order.
        self._file = open(self.out_dir / f"shard-{self._shard:05d}.tmp", "wb", buffering=0)
        _write_all(self._file.fileno(), len(raw).to_bytes(8, "little") + raw)

    def _next_slot(self, key: str, shape: list[int], dtype: torch.dtype) -> None:
        if self._file is None or self._pos == len(self.shards[self._shard]):
            self._open_next()
        want_key, want_shape, want_dtype = self.shards[self._shard][self._pos]
        if key != want_key or shape != want_shape or dtype != want_dtype:
            raise RuntimeError(f"export wrote {key} {shape} {dtype} where the plan has "
                               f"{want_key} {want_shape} {want_dtype}")
        self._pos += 1

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self._next_slot(key, list(tensor.shape), tensor.dtype)
        self._flush_run()
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            _write_all(self._file.fileno(), memoryview(flat.view(torch.uint8).numpy()))

    def add_bytes(self, key: str, shape: list[int], dtype: torch.dtype, src_fd: int, begin: int, end: int,
                  src_path: Path) -> None:
        """The next tensor is bytes ``begin:end`` of the open file ``src_fd``, stored as is. Runs
        that are contiguous in both files (the same layout) go to the kernel as one copy."""
        self._next_slot(key, shape, dtype)
        run = self._run
        if run is not None and run[0] == src_fd and run[2] == begin:
            run[2] = end
        else:
            self._flush_run()
            self._run = [src_fd, begin, end, f"{src_path} is truncated at tensor {key} or after it"]

    def _flush_run(self) -> None:
        if self._run is not None:
            src_fd, begin, end, truncated = self._run
            self._run = None
            self._copier.copy(src_fd, begin, end - begin, self._file.fileno(), truncated)

    def finish(self) -> None:
        self._flush_run()
        if self._file is not None:
            self._file.close()
        written = sum(len(s) for s in self.shards[:self._shard]) + self._pos
        if written != sum(len(s) for s in self.shards):
            raise RuntimeError(f"export wrote {written} tensors of {sum(len(s) for s in self.shards)}")
        n = len(self.shards)
        if n == 1:
            os.replace(self.out_dir / "shard-00000.tmp", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, shard in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i:05d}.tmp", self.out_dir / final)
            weight_map.update({key: final for key, _, _ in shard})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(fd, view):]


# copy_file_range refuses some file pairs (EXDEV across filesystems on older kernels, EINVAL or
# EOPNOTSUPP on some network and overlay filesystems, ENOSYS without the syscall): fall back.
_COPY_FALLBACK = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


class _ByteCopier:
    """Copies byte ranges file to file inside the kernel: ``copy_file_range``, else ``sendfile``,
    else ``pread``/``write`` through a buffer. The first refusal of a way is remembered."""

    CHUNK = 1 << 30

    def __init__(self):
        self.way = "copy_file_range" if hasattr(os, "copy_file_range") else "sendfile"

    def copy(self, src_fd: int, offset: int, count: int, dst_fd: int, truncated: str) -> None:
        """``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd`` at its current position."""
        while count > 0:
            n = self._copy_some(src_fd, offset, min(count, self.CHUNK), dst_fd)
            if not n:
                raise ConfigError(truncated)
            offset += n
            count -= n

    def _copy_some(self, src_fd: int, offset: int, count: int, dst_fd: int) -> int:
        if self.way == "copy_file_range":
            try:
                return os.copy_file_range(src_fd, dst_fd, count, offset)
            except OSError as e:
                if e.errno not in _COPY_FALLBACK:
                    raise
                logger.debug("copy_file_range refused (%s); export copies with sendfile", e)
                self.way = "sendfile"
        if self.way == "sendfile":
            try:
                return os.sendfile(dst_fd, src_fd, offset, count)
            except (OSError, AttributeError) as e:
                if isinstance(e, OSError) and e.errno not in _COPY_FALLBACK:
                    raise
                logger.debug("sendfile refused (%s); export copies through a buffer", e)
                self.way = "read"
        data = os.pread(src_fd, min(count, 64 << 20), offset)
        _write_all(dst_fd, data)
        return len(data)


def _nbytes(shape: list[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _layer_keys(layers: set[str], all_keys: list[str], prefix: str | None) -> dict[str, str]:
    """Map each adapted module name to its checkpoint key. Checkpoints of some models omit the
    base-model prefix (old OPT hub files say ``decoder.layers...`` for ``model.decoder.layers...``)."""
    keyset = set(all_keys)
    mapping = {}
    for name in layers:
        candidates = [f"{name}.weight"]
        if prefix and name.startswith(prefix + "."):
            candidates.append(f"{name[len(prefix) + 1:]}.weight")
        hit = next((c for c in candidates if c in keyset), None)
        if hit is None:
            raise ConfigError(f"the base checkpoint has no tensor for the adapted layer {name} (looked for "
                              f"{' or '.join(candidates)}); wrong base model for the delta")
        mapping[hit] = f"{name}.weight"
    return mapping


def _check_base(fingerprint: dict, read_tensor) -> None:
    for name, want in fingerprint["matrices"].items():
        tensor = read_tensor(name)
        if list(tensor.shape) != want["shape"]:
            raise ConfigError(f"base weight {name}.weight has shape {list(tensor.shape)}, but the delta was trained "
                              f"on a base where it has shape {want['shape']} (wrong base model for the delta)")
        pos = _sample_positions(tensor.numel(), name)
        got = tensor.reshape(-1)[pos].float()
        exp = torch.tensor(want["sample"])
        err = ((got - exp).abs() / (exp.abs() + 1e-3)).max().item()
        if err > FINGERPRINT_RTOL:
            raise ConfigError(f"base weight {name}.weight has other values than the base this delta was trained on "
                              f"(sampled entries differ by up to {err:.2g} relative); wrong base model for the delta")


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str) -> None:
    for item in base_dir.iterdir():
        if item.is_dir() or item.name.endswith(WEIGHT_SUFFIXES) or item.name.endswith(".index.json"):
            continue
        if item.name == "config.json":
            config = json.loads(item.read_text())
            config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
            config.pop("dtype", None)
            (out_dir / "config.json").write_text(json.dumps(config, indent=2))
        else:
            shutil.copy2(item, out_dir / item.name)


def export_hf(source: str | os.PathLike, out_dir: str | os.PathLike, *, base_model: str | None = None,
              dtype: str = "bf16", max_shard_size: str | int = "5GB", overwrite: bool = False,
              command: str | None = None) -> Path:
    """Merge the delta found at ``source`` into its base and write a standard HF model directory.

    The directory is written under a temporary name next to ``out_dir`` and renamed into place
    at the end, so an interrupted export leaves no half-written model behind. ``README.md`` is a
    model card (:mod:`sparse_ft.model_card`); ``command`` is the command line it names.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size)
    delta_path = find_delta(source)
    tensors, meta = read_delta(delta_path)
    config = config_from_dict(meta["method"])
    base = base_model or meta.get("base_model")
    if not base:
        raise ConfigError(f"{delta_path} does not record its base model; pass --base-model")
    base_dir = resolve_base_dir(base)
    out_dir = check_out_dir(out_dir, overwrite, {"the base model": base_dir, "the source run": Path(source),
                                                 "the delta's directory": delta_path.parent})
    tmp_dir = make_staging(out_dir)
    try:
        _export_into(tmp_dir, out_dir, delta_path, tensors, meta, config, base, base_dir, dtype, max_shard_size, limit,
                     command)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # only the staging directory this export created
        raise
    logger.info("exported %s merged into %s -> %s", delta_path, base, out_dir)
    return out_dir


STAGING = ".partial-"
EXPORT_RECORD = "sparse_ft_export.json"


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool, protected: dict[str, Path]) -> Path:
    """``--out`` as an absolute path, refused when it cannot or must not be (re)placed: a file, the
    working directory or a parent of it, and with ``--overwrite`` any of ``protected`` (base model,
    source run) or a parent of one, or a directory that no export wrote (it has no record)."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; allowed: a directory path (new, or an earlier export with "
                          "--overwrite)")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents or out == Path(out.anchor):
        raise ConfigError(f"--out {out_dir} is the working directory or a parent of it; allowed: a new directory "
                          "such as ./exported")
    if not out.exists() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise ConfigError(f"--out {out_dir} exists and is not empty; choose another directory or pass --overwrite")
    for what, path in protected.items():
        path = Path(path).expanduser().resolve()
        if out == path or out in path.parents:
            raise ConfigError(f"--out {out_dir} is {what} ({path}) or a parent of it; --overwrite never replaces "
                              "those. Choose another directory")
    if not (out / EXPORT_RECORD).is_file():
        raise ConfigError(f"--out {out_dir} holds files that no sparse-ft export wrote (no {EXPORT_RECORD}); "
                          "--overwrite only replaces an earlier export. Choose another directory or empty it yourself")
    return out


def make_staging(out_dir: Path) -> Path:
    """A fresh directory of this export's own next to ``out_dir`` (``<out>.partial-<pid>-<random>``)."""
    import secrets

    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_dir.with_name(f"{out_dir.name}{STAGING}{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
    except OSError as e:
        raise ConfigError(f"--out {out_dir}: cannot write in {out_dir.parent} ({e.strerror or e}); choose a writable "
                          "directory") from None
    return tmp


def _export_into(tmp_dir, out_dir, delta_path, tensors, meta, config, base, base_dir, dtype, max_shard_size,
                 limit, command=None) -> None:
    """Write the export into ``tmp_dir`` (its own staging directory), then rename it to ``out_dir``."""
    files = base_weight_files(base_dir)
    layers = config.delta_layer_names(tensors)
    quant = meta.get("quantization")
    if not config.mergeable:
        _export_delta_with_loader(delta_path, base, tmp_dir, config)
        quant = None  # nothing merged, nothing dequantized
    elif not files:
        if quant is not None:
            raise ConfigError(f"{delta_path} was trained on a {quant['scheme']}-quantized base, which export "
                              f"re-quantizes from the base's safetensors or .bin weights; {base_dir} has none")
        _export_in_memory(delta_path, base_dir, tmp_dir, dtype, max_shard_size, meta)
    else:
        _export_streaming(files, base_dir, config, tensors, layers, meta, tmp_dir, DTYPES[dtype], limit)
        _copy_side_files(base_dir, tmp_dir, dtype)
    provenance = {"exported_by": f"sparse-ft {meta.get('sparse_ft_version')}", "delta": str(delta_path),
                  "base_model": str(base), "method": meta["method"], "dtype": dtype}
    if quant is not None:
        provenance["dequantized"] = {k: v for k, v in quant.items() if k != "modules"}
        provenance["dequantized"]["layers"] = len(quant["modules"])
        logger.info("the delta was trained on a %s-quantized base: dequantized its %d quantized linear layers (as "
                    "bitsandbytes loaded them) to %s, then merged the delta", quant["scheme"], len(quant["modules"]),
                    dtype)
    (tmp_dir / EXPORT_RECORD).write_text(json.dumps(provenance, indent=2))
    write_model_card(tmp_dir, delta_path=delta_path, meta=meta, tensors=tensors, base=str(base), fmt="hf",
                     command=command, keep_note=not config.mergeable)
    if out_dir.exists():
        # Move the earlier export aside before the new one takes its name; delete it only after.
        import secrets

        old = out_dir.with_name(f"{out_dir.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


LOADER = '''"""Load this export: the base model plus the sparse-ft compact delta beside this file.

{why}

    from load_model import load
    model = load()   # or load(torch_dtype=torch.bfloat16, device_map="auto")
"""
from pathlib import Path

BASE_MODEL = {base!r}


def load(base_model: str = BASE_MODEL, **from_pretrained_kwargs):
    import sparse_ft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, **from_pretrained_kwargs)
    return sparse_ft.load_delta(model, Path(__file__).resolve().parent / "delta.safetensors")
'''


def _export_delta_with_loader(delta_path: Path, base: str, out_dir: Path, config) -> None:
    """For methods no plain HF architecture can hold (ProPETL's adapter kind): the compact delta,
    a ``load_model.py`` that puts it on the base with :func:`sparse_ft.load_delta`, and a note."""
    why = (f"The {config.method} method as configured here ({json.dumps(config.to_dict())}) adds modules that no "
           "plain Hugging Face architecture has, so its weights cannot be merged into a standard checkpoint.")
    shutil.copy2(delta_path, out_dir / "delta.safetensors")
    (out_dir / "load_model.py").write_text(LOADER.format(why=why, base=str(base)))
    (out_dir / "README.md").write_text(f"# Not a plain Hugging Face checkpoint\n\n{why}\n\nLoad it with sparse-ft "
                                       "installed: `from load_model import load; model = load()` (base model from "
                                       "the hub or a local path, plus `sparse_ft.load_delta`).\n")
    logger.warning("%s: not mergeable into plain HF weights; wrote the compact delta and load_model.py instead",
                   config.method)


def _base_prefix(base_dir: Path) -> str | None:
    try:
        model_type = json.loads((base_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return {"opt": "model"}.get(model_type, "model")


# Tensors the delta leaves alone and whose dtype stays are copied as bytes (False: every tensor is
# read, merged and encoded, the earlier path; tests and the benchmark compare the two).
_BYTE_COPY = True


@torch.no_grad()
def _export_streaming(files, base_dir, config, tensors, layers, meta, out_dir, dtype, limit) -> None:
    """Stream the base, merging the delta. A delta trained on a quantized base first gets every
    quantized layer's weight quantized and dequantized as loading did (:func:`sparse_ft.quant.roundtrip`):
    the merged model is then the model that trained, not the unquantized base plus its delta."""
    readers = [_ShardReader(f) for f in files]
    quant = meta.get("quantization")
    prefix = _base_prefix(base_dir)
    quantized = set(quant["modules"]) if quant else set()

    def as_trained(model_key: str, tensor: torch.Tensor) -> torch.Tensor:
        name, _, leaf = model_key.rpartition(".")
        if leaf != "weight" or not quantized or (name not in quantized and f"{prefix}.{name}" not in quantized):
            return tensor
        return roundtrip(tensor, quant)

    # Every shard's header, read once: it maps keys to shards and lays out the output shards.
    specs = [(reader, reader.specs()) for reader in readers]
    key_file = {key: reader for reader, entries in specs for key, _, _ in entries}
    mapping = _layer_keys(layers, list(key_file), prefix)
    by_module = {v[:-len(".weight")]: k for k, v in mapping.items()}

    def read_named(name: str) -> torch.Tensor:
        ckpt_key = by_module.get(name, f"{name}.weight")
        reader = key_file.get(ckpt_key)
        if reader is None:
            raise ConfigError(f"the base checkpoint has no tensor {ckpt_key}; wrong base model for the delta")
        from safetensors import safe_open

        if reader.path.suffix == ".safetensors":
            with safe_open(str(reader.path), framework="pt") as f:
                return as_trained(f"{name}.weight", f.get_tensor(ckpt_key))
        return as_trained(f"{name}.weight", dict(reader.items())[ckpt_key])

    _check_base(meta["base_fingerprint"], read_named)
    writer = _ShardWriter(out_dir, limit, [(key, shape, dtype if dtype_.is_floating_point else dtype_)
                                           for _, entries in specs for key, shape, dtype_ in entries])

    def as_bytes(reader: _ShardReader, key: str, dtype_: torch.dtype) -> bool:
        """Whether ``key`` goes to the output as the base's bytes: stored the same, changed by nothing."""
        if not _BYTE_COPY or key not in reader.spans or (dtype_.is_floating_point and dtype_ != dtype):
            return False
        model_key = mapping.get(key, key)
        name, _, leaf = model_key.rpartition(".")
        if leaf == "weight" and quantized and (name in quantized or f"{prefix}.{name}" in quantized):
            return False
        return not config.export_touches(model_key, tensors, layers)

    plan = [(reader, key, shape, dtype_, as_bytes(reader, key, dtype_))
            for reader, entries in specs for key, shape, dtype_ in entries]
    decode = {}
    for reader, key, _, _, copy in plan:
        if not copy:
            decode.setdefault(reader, set()).add(key)
    # Only the tensors that change are read (ahead, by a thread); the rest move file to file.
    decoded = _prefetch(kv for reader in readers if reader in decode for kv in reader.items(decode[reader]))
    fds: dict[_ShardReader, int] = {}
    try:
        for reader, key, shape, dtype_, copy in plan:
            if copy:
                if reader not in fds:
                    fds[reader] = os.open(reader.path, os.O_RDONLY)
                writer.add_bytes(key, shape, dtype_, fds[reader], *reader.spans[key], reader.path)
                continue
            got, tensor = next(decoded)
            if got != key:
                raise RuntimeError(f"export read {got} where it expected {key}")
            model_key = mapping.get(key, key)
            out = config.export_tensor(model_key, as_trained(model_key, tensor), tensors, layers)
            if tensor.is_floating_point():
                out = out.to(dtype)
            writer.add(key, out)
        writer.finish()
    finally:
        decoded.close()
        for fd in fds.values():
            os.close(fd)


def _prefetch(items, depth: int = 2):
    """Yield from ``items`` while a thread reads up to ``depth`` ahead: the base's reads overlap the
    merge and the output's writes (file I/O and torch ops release the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    thread = threading.Thread(target=produce, name="export-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _export_in_memory(delta_path, base_dir, out_dir, dtype, max_shard_size, meta) -> None:
    """For bases transformers can load but we cannot stream (GGUF): load, merge, save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = json.loads(meta.get("model_kwargs", "{}"))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **extra)
    load_delta(model, delta_path)
    merge(model)
    if extra.get("gguf_file"):
        # transformers dequantises GGUF weights as it loads them but keeps the GGUF "quantizer",
        # which refuses to save; the weights in memory are plain tensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(DTYPES[dtype]).save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    try:
        AutoTokenizer.from_pretrained(str(base_dir), **extra).save_pretrained(str(out_dir))
    except (OSError, ValueError) as e:
        logger.warning("could not copy the tokenizer: %s", e)
