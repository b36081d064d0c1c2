"""Where tensors come from: a Hugging Face safetensors directory (an embedded one by its name, e.g. `coder`),
a seeded preset, or a model in memory (to write it as a checkpoint)."""

from __future__ import annotations

import json
import logging
import re
import zlib
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

from moe_service.checkpoint.names import expected_shapes, expert_hf_names, hf_name
from moe_service.model.args import ModelArgs
from moe_service.model.fp8 import BLOCK
from moe_service.model.presets import GATE_SKEW, PRESET_SEED, PRESETS, preset_args

log = logging.getLogger("moe_service.checkpoint")
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_INDEX.match(name)
    return int(m.group(1)) if m else None


class TensorSource(Protocol):
    args: ModelArgs
    reads: list[str]  # names read so far, in order (tests check that a process reads only its share)
    fp8: bool  # its linear weights may be FP8 blocks (`quantization_config`: fp8, e4m3, [128, 128])

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def is_fp8(self, name: str) -> bool: ...
    def read(self, name: str) -> torch.Tensor: ...
    def describe(self, name: str) -> str: ...


def read_quantization(config: dict) -> bool:
    """Whether a config.json says its weights are FP8 blocks; ValueError for any quantization this loader
    does not read, naming the setting."""
    q = config.get("quantization_config")
    if not q:
        return False
    method, fmt, block = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
    if method != "fp8":
        raise ValueError(f"config.json has quantization_config.quant_method {method!r}; this loader reads 'fp8' "
                         "(DeepSeek-V3's block format) or unquantized checkpoints")
    if fmt != "e4m3":
        raise ValueError(f"config.json has quantization_config.fmt {fmt!r}; FP8 weights must be 'e4m3' (float8_e4m3fn)")
    if list(block or []) != [BLOCK, BLOCK]:
        raise ValueError(f"config.json has quantization_config.weight_block_size {block}; this loader reads "
                         f"[{BLOCK}, {BLOCK}] blocks")
    return True


class SafetensorsSource:
    """A Hugging Face checkpoint directory: `config.json` plus `model.safetensors`, or shards with
    `model.safetensors.index.json`. Tensors are read one at a time, only when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(
                f"checkpoint directory {str(self.path)!r} does not exist; expected a Hugging Face "
                f"DeepSeek-V2 directory (config.json + *.safetensors) or a preset name {sorted(PRESETS)}"
            )
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} is missing; a checkpoint directory needs config.json")
        self.config = json.loads(config_file.read_text())
        self.args = ModelArgs.from_hf_config(self.config, name=self.path.name)
        self.fp8 = read_quantization(self.config)
        self.file_of = self._index()
        self._handles: dict[str, object] = {}
        self.reads: list[str] = []
        mtp = [n for n in self.file_of if (layer := _layer_of(n)) is not None and layer >= self.args.num_hidden_layers]
        if mtp:
            log.info("%s: %d tensors of the multi-token-prediction layer(s) (model.layers.%d and above) are read "
                     "only as a draft (load_model(with_mtp=True))", self.path, len(mtp), self.args.num_hidden_layers)

    def _index(self) -> dict[str, str]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no 'weight_map' object")
            for file in set(weight_map.values()):
                if not (self.path / file).is_file():
                    raise FileNotFoundError(f"{index} names shard {file!r}, which is not in {self.path}")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} has no *.safetensors file and no model.safetensors.index.json")
        file_of = {}
        for file in files:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    file_of[key] = file.name
        return file_of

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.path / file, "pt")
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of[name]).get_slice(name).get_shape())

    def is_fp8(self, name: str) -> bool:
        return self._handle(self.file_of[name]).get_slice(name).get_dtype() == "F8_E4M3"

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self._handle(self.file_of[name]).get_tensor(name)

    def describe(self, name: str) -> str:
        return f"{self.path / self.file_of[name]}" if name in self.file_of else str(self.path)


class PresetSource:
    """A preset's weights, each tensor drawn from its own seed so any subset is reproducible alone
    (an expert worker makes only the experts it hosts)."""

    fp8 = False

    def __init__(self, name: str, seed: int = PRESET_SEED) -> None:
        self.args = preset_args(name)
        self.seed = seed
        self.shapes = expected_shapes(self.args, mtp=True)
        self.reads: list[str] = []

    def names(self) -> set[str]:
        return set(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def is_fp8(self, name: str) -> bool:
        return False

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        shape = self.shapes[name]
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            return torch.ones(shape)
        g = torch.Generator().manual_seed(self.seed ^ zlib.crc32(name.encode()))
        t = torch.randn(shape, generator=g).mul_(0.02)
        if name.endswith(".mlp.gate.weight") and self.args.name in GATE_SKEW:
            hot, scale = GATE_SKEW[self.args.name]
            # the hot experts have even ids: with experts placed round robin they all land on the same
            # worker(s), the case rebalancing exists for
            t[0 : 2 * hot : 2] *= scale
        return t

    def describe(self, name: str) -> str:
        return f"preset {self.args.name!r}"


class ModuleSource:
    """A Transformer in memory under its checkpoint names: its stacked experts read as per-expert tensors."""

    fp8 = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.args = model.args
        self.reads: list[str] = []
        self.tensors = {hf_name(n): p.detach() for n, p in model.named_parameters() if ".mlp.experts." not in n}
        drafts = [l for l in self.args.mtp_layers if str(l) in model.mtp and self.args.is_moe_layer(l)]
        for layer in [*self.args.moe_layers, *drafts]:
            ex = (model.layers[layer] if layer < self.args.num_hidden_layers else model.mtp[str(layer)]).mlp.experts
            for e in range(self.args.n_routed_experts):
                stacked = {"gate_up_proj": ex.gate_up_proj[e].detach(), "down_proj": ex.down_proj[e].detach()}
                for param, names in expert_hf_names(layer, e).items():
                    for name, rows in zip(names, stacked[param].chunk(len(names), dim=0)):
                        self.tensors[name] = rows

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def is_fp8(self, name: str) -> bool:
        return False

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self.tensors[name]

    def describe(self, name: str) -> str:
        return f"model {self.args.name!r} in memory"


# checkpoints that ship inside the package, by name (docs/models.md)
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "models"


def checkpoint_dir(source: "str | Path | TensorSource") -> Path | None:
    """The directory a model name stands for (an embedded checkpoint's, or the path itself); None for a
    seeded preset or a source already open. Tokenizer and chat template files are read from it."""
    if not isinstance(source, (str, Path)) or (isinstance(source, str) and source in PRESETS):
        return None
    if isinstance(source, str) and "/" not in source and (EMBEDDED_DIR / source / "config.json").is_file():
        return EMBEDDED_DIR / source
    return Path(source)


def open_source(source: "str | Path | TensorSource") -> "TensorSource":
    """A preset name, an embedded checkpoint's name, a checkpoint directory, or an already-open source."""
    if not isinstance(source, (str, Path)):
        return source
    if isinstance(source, str) and source in PRESETS:
        return PresetSource(source)
    return SafetensorsSource(checkpoint_dir(source))
