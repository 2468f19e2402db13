"""The Fisher store: the contract between ``estimate`` (writes) and the ``fisher`` method (reads).

Format v1 is a directory that can be published as a Hub model repo::

    fisher.safetensors | fisher-0000K-of-0000N.safetensors + fisher.safetensors.index.json
    fisher_config.json     provenance, estimator settings, statistics, binding
    README.md              a card

Tensor names are the weight names mergekit's pipeline uses. A Fisher tensor has its weight's
shape or any shape that broadcasts to it (mask-node stores use ``[out, 1]`` / ``[1, in]``).

**Binding.** For every tensor the store keeps a fingerprint of the weight it was computed on:
the weight's shape, the dtype the estimator saw, and 64 of its values at fixed, spread-out flat
positions. At merge time the arriving weight's values at the same positions are compared
(exactly, at the coarser of the two dtypes), which costs a 64-element gather. A different
model or revision, a layer remapped by ``slices:``, or a permuted vocabulary changes those
values. The fingerprint also *locates* a Fisher tensor: when the output name's fingerprint does
not match (``slices:`` with shifted layers, a tied ``lm_head`` fed from ``embed_tokens``), the
reader finds the unique tensor of the store whose fingerprint does. Identical weights (e.g. norm
weights that are all ones in an untrained model) cannot be told apart; that only matters where
the Fisher of those layers differs and the layers are remapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_fisher.errors import FisherError

LOG = logging.getLogger(__name__)

FORMAT_NAME = "mergekit-fisher"
FORMAT_VERSION = 1
CONFIG_NAME = "fisher_config.json"
SINGLE_FILE = "fisher.safetensors"
INDEX_FILE = "fisher.safetensors.index.json"
CARD_NAME = "README.md"
DEFAULT_SHARD_SIZE = 5 * 1024**3
FINGERPRINT_SAMPLES = 64

GRANULARITIES = ("full", "nodes")
STATISTICS = ("fisher", "gram")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class StoreError(FisherError):
    """A one-line, user-facing problem with a Fisher store: names the store and the fix."""


# --------------------------------------------------------------------------- binding


def _fingerprint_positions(numel: int) -> torch.Tensor:
    """Fixed flat positions, spread over rows and columns, so that remaps change the values."""
    count = min(FINGERPRINT_SAMPLES, numel)
    i = torch.arange(count, dtype=torch.int64)
    stride = max(numel // count, 1)
    return (i * numel) // count + (i * 7919) % stride


def fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """The binding record of one weight (JSON-ready)."""
    flat = weight.detach().reshape(-1)
    samples = flat[_fingerprint_positions(flat.numel()).to(flat.device)]
    return {
        "shape": list(weight.shape),
        "dtype": str(weight.dtype).removeprefix("torch."),
        "samples": samples.float().cpu().tolist(),
    }


def _coarser(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    bits = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}
    return a if bits.get(a, 23) <= bits.get(b, 23) else b


def binding_matches(binding: Mapping[str, Any], weight: torch.Tensor) -> bool:
    """Whether ``weight`` is the tensor ``binding`` was recorded on (to the coarser precision)."""
    if list(weight.shape) != list(binding["shape"]):
        return False
    stored_dtype = getattr(torch, binding["dtype"], torch.float32)
    common = _coarser(stored_dtype, weight.dtype)
    flat = weight.detach().reshape(-1)
    arriving = flat[_fingerprint_positions(flat.numel()).to(flat.device)].cpu()
    stored = torch.tensor(binding["samples"], dtype=torch.float32)
    a, b = arriving.to(common).float(), stored.to(common).float()
    if torch.equal(a, b):
        return True
    if stored_dtype == weight.dtype:
        return False
    # Converting through a third dtype can round twice: allow one unit in the last place.
    ulp = torch.finfo(common).eps * torch.maximum(a.abs(), b.abs())
    return bool(((a - b).abs() <= ulp).all())


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one Fisher tensor, as if broadcast to its weight's shape."""

    shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    sum: float
    sumsq: float
    max: float

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "weight_shape": list(self.weight_shape),
            "sum": self.sum,
            "sumsq": self.sumsq,
            "max": self.max,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorStats:
        return cls(
            shape=tuple(data["shape"]),
            weight_shape=tuple(data["weight_shape"]),
            sum=float(data["sum"]),
            sumsq=float(data["sumsq"]),
            max=float(data["max"]),
        )


def _broadcasts_to(shape: Iterable[int], target: Iterable[int]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(tuple(shape), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def _check_tensor(
    name: str, tensor: torch.Tensor, weight_shape: tuple[int, ...], statistic: str
) -> None:
    """Refuse what the merge could not use: wrong shape, NaN/Inf, a negative Fisher."""
    if statistic == "gram":
        if (
            tensor.ndim != 2
            or tensor.shape[0] != tensor.shape[1]
            or tensor.shape[1] != weight_shape[-1]
        ):
            raise StoreError(
                f"Gram tensor {name!r} has shape {list(tensor.shape)}; a weight of shape "
                f"{list(weight_shape)} needs a square [{weight_shape[-1]}, {weight_shape[-1]}] Gram"
            )
    elif not _broadcasts_to(tensor.shape, weight_shape):
        raise StoreError(
            f"Fisher tensor {name!r} has shape {list(tensor.shape)}, which does not broadcast to "
            f"its weight's shape {list(weight_shape)}: pass the weight's shape or a broadcastable one"
        )
    if not torch.isfinite(tensor).all():
        raise StoreError(f"{statistic} tensor {name!r} has NaN or Inf values: refusing to write it")
    if statistic == "fisher" and tensor.numel() and tensor.min() < 0:
        raise StoreError(
            f"Fisher tensor {name!r} has negative values: a diagonal Fisher is a mean of squares"
        )


def _tensor_stats(tensor: torch.Tensor, weight_shape: tuple[int, ...]) -> TensorStats:
    """Statistics of the stored values, as if broadcast to ``weight_shape``."""
    t = tensor.double()
    repeat = math.prod(weight_shape) // max(t.numel(), 1)
    return TensorStats(
        shape=tuple(tensor.shape),
        weight_shape=tuple(weight_shape),
        sum=float(t.sum()) * repeat,
        sumsq=float((t * t).sum()) * repeat,
        max=float(t.max()) if t.numel() else 0.0,
    )


# --------------------------------------------------------------------------- writing


def _shard_plan(tensors: Mapping[str, torch.Tensor], shard_size: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, stem: str, shard_size: int
) -> None:
    """``STEM.safetensors``, or ``STEM-0000K-of-0000N.safetensors`` shards plus
    ``STEM.safetensors.index.json``: the Hugging Face layout (``stem="model"`` for models)."""
    shards = _shard_plan(tensors, shard_size)
    if len(shards) == 1:
        save_file(dict(tensors), str(directory / f"{stem}.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(shards, start=1):
        filename = f"{stem}-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {n: tensors[n] for n in names}, str(directory / filename), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(names, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        directory / f"{stem}.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a hidden sibling, so a failed run leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Refuse to replace a non-empty ``out`` unless asked: checked before long work starts."""
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise StoreError(f"{out} already exists and is not empty: pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_directory(out: Path, *, overwrite: bool):
    """Yield a temporary sibling of ``out`` that replaces ``out`` only if the block succeeds."""
    out = Path(out)
    check_out_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_store(
    out: str | os.PathLike[str],
    fisher: Mapping[str, torch.Tensor],
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    model: str | None = None,
    revision: str | None = None,
    granularity: str = "full",
    estimator: Mapping[str, Any] | None = None,
    store_dtype: torch.dtype = torch.bfloat16,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    statistic: str = "fisher",
    consumers: Mapping[str, str] | None = None,
) -> FisherStore:
    """Write a v1 store atomically and return it opened.

    ``weights`` maps each weight name to the weight a tensor describes: it gives the shape that
    broadcast tensors are expanded to for statistics and the binding fingerprint. Without it the
    store is unbound (the merge cannot check that it describes the right weights) and each
    Fisher tensor must have its weight's full shape.

    ``statistic="gram"`` stores input Gram matrices for RegMean; ``consumers`` then maps every
    weight name to the Gram tensor of its input (q/k/v projections share one).
    """
    consumers = dict(consumers) if consumers is not None else {n: n for n in fisher}
    shapes = _check_inputs(fisher, weights, granularity, statistic, consumers)
    stored = {
        name: tensor.detach().to(device="cpu", dtype=store_dtype).contiguous()
        for name, tensor in fisher.items()
    }
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "statistic": statistic,
        "model": {"name_or_path": model, "revision": revision},
        "granularity": granularity,
        "uncovered": "average" if granularity == "nodes" or statistic == "gram" else "error",
        "store_dtype": str(store_dtype).removeprefix("torch."),
        "estimator": dict(estimator or {}),
        "statistics": _statistics(stored, shapes, consumers, statistic),
        "consumers": {w: consumers[w] for w in sorted(consumers)},
        "binding": (
            {w: fingerprint(weights[w]) for w in sorted(consumers)} if weights is not None else None
        ),
    }
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        write_safetensors(stored, tmp, "fisher", shard_size)
        _write_json(tmp / CONFIG_NAME, config)
        (tmp / CARD_NAME).write_text(render_card(config), encoding="utf-8")
    LOG.info("wrote %s store %s (%d tensors)", statistic, out, len(stored))
    return FisherStore(Path(out))


def _check_inputs(
    fisher: Mapping[str, torch.Tensor],
    weights: Mapping[str, torch.Tensor] | None,
    granularity: str,
    statistic: str,
    consumers: Mapping[str, str],
) -> dict[str, tuple[int, ...]]:
    """Refuse what the store could not describe; returns each weight's shape."""
    if granularity not in GRANULARITIES:
        raise StoreError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if statistic not in STATISTICS:
        raise StoreError(f"statistic must be one of {STATISTICS}, not {statistic!r}")
    if not fisher:
        raise StoreError("refusing to write an empty store: no tensors were given")
    unknown = sorted(set(consumers.values()) - set(fisher))
    if unknown:
        raise StoreError(f"consumers name tensor(s) {unknown[:5]} that were not given")
    if weights is not None:
        absent = sorted(set(consumers) - set(weights))
        if absent:
            raise StoreError(f"no weight given for tensor(s) {absent[:5]}: cannot bind them")
    shapes = {
        weight: tuple(weights[weight].shape) if weights is not None else tuple(fisher[name].shape)
        for weight, name in consumers.items()
    }
    for weight, name in consumers.items():
        _check_tensor(name, fisher[name], shapes[weight], statistic)
    return shapes


def _statistics(
    stored: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    consumers: Mapping[str, str],
    statistic: str,
) -> dict[str, Any]:
    """Statistics of what the merge will read: the stored values, expanded as used."""
    expanded = {name: tuple(stored[name].shape) for name in stored}
    for weight, name in consumers.items():
        if statistic == "fisher":
            expanded[name] = shapes[weight]
    stats = {name: _tensor_stats(stored[name], expanded[name]) for name in stored}
    return {
        "global_l2_norm": math.sqrt(sum(s.sumsq for s in stats.values())),
        "global_sum": sum(s.sum for s in stats.values()),
        "num_tensors": len(stats),
        "num_elements": sum(math.prod(shapes[w]) for w in consumers),
        "stored_elements": sum(t.numel() for t in stored.values()),
        "tensors": {name: stats[name].to_json() for name in sorted(stats)},
    }


def is_hub_id(ref: str) -> bool:
    """``org/name`` that is no local path: the only kind of id a Hub card may link to."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).expanduser().exists()


def render_card(config: Mapping[str, Any], picture: str | None = None) -> str:
    """A Hub model card: what the store describes, how it was made, how to use it; with
    ``picture`` (a file name in the store) the Fisher mass picture embedded."""
    model = config["model"].get("name_or_path") or "unknown model"
    revision = config["model"].get("revision")
    est = config.get("estimator") or {}
    stats = config["statistics"]
    rows = "\n".join(f"| {k} | {v} |" for k, v in est.items() if not isinstance(v, (dict, list)))
    base = f"base_model: {model}\n" if is_hub_id(model) else ""
    figure = (
        f"\n![Fisher mass per layer and module]({picture})\n\n"
        "Fisher mass per layer and module (log scale), drawn by `mergekit-fisher inspect --plot`.\n"
        if picture
        else ""
    )
    return f"""---
library_name: mergekit-fisher
tags: [mergekit, fisher-merging, fisher-store]
{base}---
# Fisher store for {model}

Diagonal Fisher information of `{model}`{f" (revision `{revision}`)" if revision else ""},
in the mergekit-fisher store format v{config["format_version"]} ({config["granularity"]} granularity,
{config["store_dtype"]}). {stats["num_tensors"]} tensors cover {stats["num_elements"]:,} weights.

| setting | value |
| --- | --- |
{rows or "| (none recorded) | |"}
{figure}
## Use it in a mergekit recipe

```yaml
merge_method: fisher
models:
  - model: {model}
    parameters: {{weight: 1.0, fisher: <this repo or directory>}}
  - model: <another model>
    parameters: {{weight: 1.0, fisher: <its Fisher store>}}
```

Merge with `mergekit-yaml recipe.yml out/` or `mergekit-fisher merge recipe.yml out/` after
`pip install mergekit-fisher`. The store is bound to the weights it was computed on: merging it
with other weights is refused.
"""


def refresh_card(path: Path, picture: str) -> None:
    """Re-render a local store's card so that it embeds ``picture`` (a file in the store)."""
    config = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    write_text_atomic(path / CARD_NAME, render_card(config, picture))


# --------------------------------------------------------------------------- reading


def resolve_store_path(ref: str, revision: str | None = None) -> Path:
    """A local directory, or a Hub repo id (``org/name`` or ``org/name@rev``) via the HF cache."""
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise StoreError(f"Fisher store {ref!r} is a file; point to the store directory")
        return local.resolve()
    repo, _, at_revision = ref.partition("@")
    if not _HUB_ID.match(repo):
        raise StoreError(
            f"Fisher store {ref!r} does not exist: run `mergekit-fisher estimate` to create it "
            "or fix the path (relative paths resolve against the current directory)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo,
                revision=at_revision or revision,
                allow_patterns=["*.safetensors", "*.json", "README.md"],
            )
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        raise StoreError(
            f"Fisher store {ref!r} is not a local directory and could not be fetched from the "
            f"Hub ({type(error).__name__}); check the path or repo id, or go online once to cache it"
        ) from None


def to_device(
    tensor: torch.Tensor, device: torch.device | str | None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor`` on ``device`` (None: where it is) in ``dtype`` (None: its own): moved first, in
    its own dtype, and converted there. ``cpu_bf16.to(device="cuda", dtype=torch.float32)``
    converts on the CPU before the copy, and copies twice the bytes: for 100M elements on an
    H200, 518 ms of CPU against 30 ms for ``.to("cuda")`` then ``.float()``. Plain pageable
    copies: a store tensor is read once, so pinning it first would be one more CPU copy."""
    if device is not None:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)


class FisherStore:
    """A lazily read Fisher store. Thread-safe: every read opens its own handle."""

    def __init__(self, path: Path, ref: str | None = None):
        self.path = Path(path)
        self.ref = ref or str(path)
        config_path = self.path / CONFIG_NAME
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise StoreError(
                f"{self.ref} is not a Fisher store: {CONFIG_NAME} is missing "
                "(an interrupted or foreign directory?); re-run `mergekit-fisher estimate`"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise StoreError(f"{config_path} is corrupt ({error}); re-create the store") from None
        if self.config.get("format") != FORMAT_NAME:
            raise StoreError(f"{config_path} is not a mergekit-fisher store config")
        version = self.config.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(
                f"{self.ref} has store format v{version}; this mergekit-fisher reads "
                f"v{FORMAT_VERSION}: upgrade mergekit-fisher or re-create the store"
            )
        self._weight_map = self._read_weight_map()
        self._stats = {
            name: TensorStats.from_json(data)
            for name, data in self.config["statistics"]["tensors"].items()
        }
        absent = sorted(set(self._stats) - set(self._weight_map))
        if absent:
            raise StoreError(f"{self.ref} is incomplete: tensor(s) {absent[:5]} are in no file")
        self._binding: dict[str, Any] | None = self.config.get("binding")
        self._tensor_of: dict[str, str] = self.config.get("consumers") or {
            n: n for n in self._stats
        }
        self._by_fingerprint_lock = threading.Lock()
        self._shape_index: dict[tuple[int, ...], list[str]] | None = None

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as error:
                raise StoreError(f"{index} is corrupt ({error}); re-create the store") from None
        elif (self.path / SINGLE_FILE).exists():
            weight_map = dict.fromkeys(self._header_names(SINGLE_FILE), SINGLE_FILE)
        else:
            raise StoreError(
                f"{self.ref} has no {SINGLE_FILE} or {INDEX_FILE}; re-create the store"
            )
        for filename in set(weight_map.values()):
            if not (self.path / filename).exists():
                raise StoreError(f"{self.ref} is incomplete: shard {filename} is missing")
        return weight_map

    def _header_names(self, filename: str) -> list[str]:
        with self._open(filename) as handle:
            return list(handle.keys())

    @contextlib.contextmanager
    def _open(self, filename: str) -> Iterator[Any]:
        """A safetensors handle for one read. Not cached: a handle keeps its file mapped, and
        every page a merge touched would stay resident for the whole merge (a second model's
        worth of RSS per store)."""
        try:
            handle = safe_open(str(self.path / filename), framework="pt")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise StoreError(
                f"{self.path / filename} is not a readable safetensors file ({error}); "
                "the store is corrupt or truncated: re-create or re-download it"
            ) from None
        with handle:
            yield handle

    # ----- metadata, no tensor reads
    @property
    def names(self) -> list[str]:
        return sorted(self._stats)

    def __contains__(self, weight: object) -> bool:
        """Whether the store describes the weight of that name."""
        return weight in self._tensor_of

    @property
    def statistic(self) -> str:
        return str(self.config.get("statistic", "fisher"))

    @property
    def granularity(self) -> str:
        return str(self.config.get("granularity", "full"))

    @property
    def averages_uncovered(self) -> bool:
        """Node stores leave embeddings/norms out on purpose: the merge averages those."""
        return self.config.get("uncovered") == "average"

    @property
    def global_norm(self) -> float:
        return float(self.config["statistics"]["global_l2_norm"])

    @property
    def model(self) -> str | None:
        return self.config["model"].get("name_or_path")

    @property
    def is_bound(self) -> bool:
        return self._binding is not None

    def stats(self, name: str) -> TensorStats:
        return self._stats[name]

    def consumer_count(self, tensor: str) -> int:
        """How many weights read store tensor ``tensor`` (a shared Gram serves several)."""
        return sum(1 for t in self._tensor_of.values() if t == tensor)

    # ----- tensors
    def get(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """One tensor on ``device`` (default CPU) in ``dtype``, validated: finite; a Fisher also
        non-negative (see ``reader``)."""
        with self.reader(name, device=device, dtype=dtype) as read:
            return read(None, None)

    @contextlib.contextmanager
    def reader(
        self,
        name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[Callable[[int | None, int | None], torch.Tensor]]:
        """``read(start, stop)``: what one tensor holds for rows [start, stop) of its weight,
        validated, through one handle kept open while the caller merges that weight a block of
        rows at a time. A tensor that broadcasts along the weight's rows (a node store's
        [1, in]) comes back whole; ``read(None, None)`` is the whole tensor. It comes on
        ``device`` (default: where safetensors reads it, the CPU) and in ``dtype`` (default: the
        stored one), moved and validated in the stored dtype and converted last, on the device
        (``to_device``): a GPU merge does no per-element work on the CPU."""
        try:
            filename = self._weight_map[name]
        except KeyError:
            raise StoreError(f"{self.ref} has no Fisher tensor {name!r}") from None
        stats = self._stats[name]
        whole_rows = len(stats.shape) < len(stats.weight_shape) or (
            stats.shape[:1] == (1,) != stats.weight_shape[:1]
        )
        with self._open(filename) as handle:

            def read(start: int | None, stop: int | None) -> torch.Tensor:
                try:
                    if whole_rows or (start is None and stop is None):
                        tensor = handle.get_tensor(name)
                    else:
                        tensor = handle.get_slice(name)[start:stop]
                except Exception as error:
                    raise StoreError(
                        f"cannot read {name!r} from {self.path / filename} ({error}): the store "
                        "is corrupt or truncated; re-create or re-download it"
                    ) from None
                tensor = to_device(tensor, device)
                self._check_values(name, tensor)
                return to_device(tensor, None, dtype)

            yield read

    def _check_values(self, name: str, tensor: torch.Tensor) -> None:
        if not tensor.numel():
            return
        # One pass over the stored dtype, on the tensor's device: NaN propagates into both, Inf
        # shows in one.
        low, high = (float(v) for v in torch.aminmax(tensor))
        if not (math.isfinite(low) and math.isfinite(high)):
            raise StoreError(f"{self.ref}: tensor {name!r} has NaN/Inf values; re-estimate")
        if self.statistic == "fisher" and low < 0:
            raise StoreError(f"{self.ref}: Fisher tensor {name!r} has negative values; re-estimate")

    def locate(self, name: str, weight: torch.Tensor) -> str | None:
        """The store tensor that describes ``weight``, arriving under output name ``name``.

        By name when that weight's binding matches; otherwise the tensor of the unique weight
        whose binding matches the arriving values. ``None`` when the store describes no such
        weight. Unbound stores can only answer by name.
        """
        if self._binding is None:
            return self._tensor_of.get(name)
        if name in self._binding and binding_matches(self._binding[name], weight):
            return self._tensor_of[name]
        matches = [
            other
            for other in self._same_shape(tuple(weight.shape))
            if other != name and binding_matches(self._binding[other], weight)
        ]
        if len(matches) == 1:
            LOG.info("%s: weight %r is served by the tensor of %r", self.ref, name, matches[0])
            return self._tensor_of[matches[0]]
        return None

    def _same_shape(self, shape: tuple[int, ...]) -> list[str]:
        with self._by_fingerprint_lock:
            if self._shape_index is None:
                index: dict[tuple[int, ...], list[str]] = {}
                for other, record in (self._binding or {}).items():
                    index.setdefault(tuple(record["shape"]), []).append(other)
                self._shape_index = index
        return self._shape_index.get(shape, [])

    def verify(self) -> None:
        """Read every tensor once: catches corruption that lazy opening cannot see."""
        for name in self.names:
            tensor = self.get(name)
            if tuple(tensor.shape) != self._stats[name].shape:
                raise StoreError(f"{self.ref}: tensor {name!r} shape differs from its statistics")

    def content_hash(self) -> str:
        """A short hash of the config (which hashes statistics and binding) for provenance."""
        blob = json.dumps(self.config, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_OPEN_LOCK = threading.Lock()
_OPENED: dict[tuple[Path, int], FisherStore] = {}


@lru_cache(maxsize=256)
def _resolve_cached(ref: str, revision: str | None) -> Path:
    return resolve_store_path(ref, revision)


def open_store(ref: str | os.PathLike[str], revision: str | None = None) -> FisherStore:
    """Open a store by local path or Hub repo id; cached per process until it is rewritten."""
    ref = str(ref)
    with _OPEN_LOCK:
        local = Path(ref).expanduser()
        path = local.resolve() if local.exists() else _resolve_cached(ref, revision)
        try:
            stamp = (path / CONFIG_NAME).stat().st_mtime_ns
        except OSError:
            stamp = -1
        key = (path, stamp)
        if key not in _OPENED:
            _OPENED[key] = FisherStore(path, ref=ref)
        return _OPENED[key]


def clear_cache() -> None:
    """Forget opened stores and resolved Hub ids."""
    with _OPEN_LOCK:
        _OPENED.clear()
        _resolve_cached.cache_clear()
