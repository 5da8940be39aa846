"""Placements in the formats other frameworks load as they are: DeepSeek EPLB's arrays, SGLang's
--init-expert-location, TensorRT-LLM's wide-EP load-balancer YAML, vllm-ascend's expert map.

Legend: L MoE layers (ours), M model layers (SGLang counts dense layers too), E logical experts, R physical slots,
G GPUs (EP ranks), S slots per GPU.

Every framework here puts physical slot p on EP rank p // S (consecutive blocks of S slots per rank), which is
our rule (cluster.py), so slot order passes through unchanged. What each loader checks, read in its source (the
upstream file and commit are named at each writer and in the README's "Formats of other frameworks"):
  eplb         phy2log [L, R] in [0, E); logcnt [L, E] its counts; log2phy [L, E, R - E + 1] each expert's slots,
               -1 padded (vLLM's port of eplb.py and its EplbState hold it this wide); int64.
  sglang       a dict with the single key physical_to_logical_map ([M, R], one row per model layer: the dict is
               passed as keyword arguments), in a .json or a torch .pt file; R = E + --ep-num-redundant-experts
               and R % ep_size == 0; every expert in every row (the static dispatch map picks among an expert's
               slots and fails on none).
  trtllm       num_slots >= E, num_slots % ep_size == 0; initial_global_assignments {model layer id: [expert per
               slot]}, every MoE layer present, each list num_slots long and holding every expert (set == range(E)).
  vllm-ascend  moe_layer_count == len(layer_list); every layer device_count devices, each with the same number of
               device_expert ids (the loader stacks them into one [L, G, S] int32 tensor); an expert at most once
               per device (the loader maps expert -> local slot, a second copy would be lost); every expert present.
Each writer checks these on the placement and raises ValueError naming what is wrong, before any file is written.
The readers (read_sglang_mapping, read_trtllm_config, read_vllm_ascend_expert_map) read our own outputs back, for
round-trip tests and for users who kept only the framework's file.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from symi_sim.checks import check_positive_int
from symi_sim.cluster import Cluster
from symi_sim.outputs import atomic_file
from symi_sim.placement import Placement, write_placement_json

logger = logging.getLogger(__name__)

# format -> the file extensions it is written to (the first is the default)
FORMAT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "json": (".json",),
    "eplb": (".npz", ".pt"),
    "sglang": (".json", ".pt"),
    "trtllm": (".yaml", ".yml"),
    "vllm-ascend": (".json",),
}
FORMATS = tuple(FORMAT_SUFFIXES)
# formats whose layers are the model's layer ids, so that dense layers in front shift them
LAYER_ID_FORMATS = ("sglang", "trtllm")


def _checked(placement: Placement, cluster: Cluster, fmt: str) -> None:
    """The checks every format shares: slots fit the cluster, every expert has a slot in every layer."""
    try:
        placement.validate(cluster)
    except ValueError as exc:
        raise ValueError(f"--format {fmt}: {exc}") from None


def _check_first_moe_layer(first_moe_layer: int) -> None:
    if isinstance(first_moe_layer, bool) or not isinstance(first_moe_layer, int | np.integer) or first_moe_layer < 0:
        raise ValueError(f"first_moe_layer must be a non-negative integer, got {first_moe_layer!r}")


# ---------------------------------------------------------------- writers: placement + cluster -> structure

def eplb_arrays(placement: Placement, cluster: Cluster) -> dict[str, np.ndarray]:
    """DeepSeek EPLB's (phy2log [L, R], log2phy [L, E, R - E + 1] -1 padded, logcnt [L, E]) int64 arrays.

    Shapes as vLLM's port of eplb.py returns them (vllm/distributed/eplb/rebalance_algo.py @ 48dca59e:
    log2phy num_redundant_experts + 1 wide); DeepSeek's eplb.py (deepseek-ai/EPLB @ 5791971) returns max(logcnt)
    columns, the same array without its trailing -1 columns. log2phy lists an expert's slots in slot order.
    """
    _checked(placement, cluster, "eplb")
    return placement.eplb_arrays()


def sglang_mapping(placement: Placement, cluster: Cluster, *, first_moe_layer: int = 0) -> dict[str, np.ndarray]:
    """SGLang's --init-expert-location dict: {"physical_to_logical_map": [M, R] int64}, M = first_moe_layer + L.

    SGLang (sgl-project/sglang python/sglang/srt/eplb/expert_location.py @ 01fec5c2,
    compute_initial_expert_location_metadata -> ExpertLocationMetadata.init_by_mapping) indexes the rows by the
    model's layer id (ModelConfigForExpertLocation.num_layers = num_hidden_layers), so the first_moe_layer dense
    layers in front get SGLang's own trivial row (slot p holds expert p % E, as init_trivial builds it).
    Physical slot p is on EP rank p // (R / ep_size): launch with --ep-size G and --ep-num-redundant-experts R - E.
    """
    _check_first_moe_layer(first_moe_layer)
    _checked(placement, cluster, "sglang")
    trivial_R = np.arange(placement.num_slots, dtype=np.int64) % placement.num_experts
    dense_MR = np.broadcast_to(trivial_R, (first_moe_layer, placement.num_slots))
    return {"physical_to_logical_map": np.concatenate([dense_MR, placement.phy2log_LR]).astype(np.int64)}


def trtllm_config(placement: Placement, cluster: Cluster, *, first_moe_layer: int = 0) -> dict[str, Any]:
    """TensorRT-LLM's wide-EP load-balancer config: {"num_slots": R, "initial_global_assignments": {model layer id:
    [expert of each slot]}, "layer_updates_per_iter": 0} (0: a static placement, the offline EP load balancer).

    Keys and checks from tensorrt_llm/llmapi/llm_args.py (MoeLoadBalancerConfig) and the fused-MoE modules'
    _init_load_balancer (NVIDIA/TensorRT-LLM @ fcd3f316), documented in examples/wide_ep/ep_load_balancer/README.md:
    layer ids are the model's (DeepSeek-V3: 3..60, so first_moe_layer=3), rank r holds slots [r*S, (r+1)*S).
    """
    _check_first_moe_layer(first_moe_layer)
    _checked(placement, cluster, "trtllm")
    return {
        "num_slots": int(placement.num_slots),
        "initial_global_assignments": {first_moe_layer + layer: placement.phy2log_LR[layer].tolist()
                                       for layer in range(placement.num_layers)},
        "layer_updates_per_iter": 0,
    }


def vllm_ascend_expert_map(placement: Placement, cluster: Cluster) -> dict[str, Any]:
    """vllm-ascend's expert-map JSON: {"moe_layer_count": L, "layer_list": [{"layer_id": l, "device_count": G,
    "device_list": [{"device_id": g, "device_expert": [expert of each of g's S slots]}]}]}.

    Loader: vllm-project/vllm-ascend vllm_ascend/ops/expert_load_balancer.py @ 1427299d (ExpertLoadBalancer:
    _expert_file_to_tensor, generate_expert_placement_map); writer of the same keys: vllm_ascend/eplb/adaptor/
    vllm_adaptor.py @ 0011ce33 (_export_tensor_to_file). layer_id counts MoE layers from 0 (dense layers are not
    in the file). An expert may sit on a device only once: the loader maps each expert to one local slot.
    """
    _checked(placement, cluster, "vllm-ascend")
    slots_per_gpu = cluster.slots_per_gpu
    device_LGS = placement.phy2log_LR.reshape(placement.num_layers, cluster.num_gpus, slots_per_gpu)
    sorted_LGS = np.sort(device_LGS, axis=2)
    twice_LGS = sorted_LGS[:, :, 1:] == sorted_LGS[:, :, :-1]
    if twice_LGS.any():
        layer, gpu, slot = np.argwhere(twice_LGS)[0]
        raise ValueError(
            f"--format vllm-ascend: layer {layer} puts expert {sorted_LGS[layer, gpu, slot]} on device {gpu} twice "
            f"({int(twice_LGS.sum())} such slots in all); vllm-ascend maps an expert to one slot per device, so a "
            "placement for it may hold an expert at most once per GPU")
    return {
        "moe_layer_count": int(placement.num_layers),
        "layer_list": [
            {"layer_id": layer, "device_count": int(cluster.num_gpus),
             "device_list": [{"device_id": gpu, "device_expert": device_LGS[layer, gpu].tolist()}
                             for gpu in range(cluster.num_gpus)]}
            for layer in range(placement.num_layers)
        ],
    }


# ---------------------------------------------------------------- files

def trtllm_yaml(config: dict[str, Any]) -> str:
    """The load-balancer config as YAML text (block mapping, one flow list per layer), written without a YAML
    library: the values are integers and lists of integers only."""
    lines = [f"num_slots: {int(config['num_slots'])}",
             f"layer_updates_per_iter: {int(config['layer_updates_per_iter'])}",
             "initial_global_assignments:"]
    for layer, experts in config["initial_global_assignments"].items():
        lines.append(f"  {int(layer)}: [{', '.join(str(int(e)) for e in experts)}]")
    return "\n".join(lines) + "\n"


def _save_torch(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        import torch  # only for users who asked for a .pt file
    except ImportError:
        raise ValueError("writing a .pt file needs torch; install symi[train] or write .json/.npz") from None
    torch.save({name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}, tmp)


def check_format_path(path: str | Path, fmt: str) -> None:
    """Raise ValueError unless fmt is known and path ends in one of its extensions."""
    if fmt not in FORMAT_SUFFIXES:
        raise ValueError(f"unknown placement format {fmt!r}; choose one of {', '.join(FORMATS)}")
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_SUFFIXES[fmt]:
        raise ValueError(f"--format {fmt} is written to a {' or '.join(FORMAT_SUFFIXES[fmt])} file, "
                         f"got {str(path)!r}")


def write_placement(path: str | Path, placement: Placement, cluster: Cluster, fmt: str = "json", *,
                    first_moe_layer: int = 0, policy: dict[str, Any] | None = None) -> None:
    """Write placement for cluster in format fmt (FORMATS) to path, atomically; ValueError (and no file) when the
    placement breaks what that framework's loader checks.

    first_moe_layer: model layer id of our layer 0 (sglang, trtllm; e.g. 3 for DeepSeek-V3's dense layers 0-2).
    policy: recorded in our own json format only.
    """
    check_format_path(path, fmt)
    _check_first_moe_layer(first_moe_layer)
    if first_moe_layer and fmt not in LAYER_ID_FORMATS:
        raise ValueError(f"first_moe_layer is for --format {' or '.join(LAYER_ID_FORMATS)} (their layer ids count "
                         f"dense layers); --format {fmt} numbers MoE layers from 0")
    suffix = Path(path).suffix.lower()
    if fmt == "json":
        _checked(placement, cluster, fmt)
        write_placement_json(path, placement, cluster, policy)
        return
    if fmt == "eplb":
        arrays = eplb_arrays(placement, cluster)
    elif fmt == "sglang":
        arrays = sglang_mapping(placement, cluster, first_moe_layer=first_moe_layer)
    elif fmt == "trtllm":
        text = trtllm_yaml(trtllm_config(placement, cluster, first_moe_layer=first_moe_layer))
    else:
        text = json.dumps(vllm_ascend_expert_map(placement, cluster), indent=1) + "\n"
    with atomic_file(path) as tmp:
        if fmt in ("trtllm", "vllm-ascend"):
            tmp.write_text(text)
        elif suffix == ".pt":
            _save_torch(tmp, arrays)
        elif suffix == ".npz":
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        else:  # sglang .json
            tmp.write_text(json.dumps({name: a.tolist() for name, a in arrays.items()}) + "\n")
    logger.info("wrote %s placement %s (%d layers x %d slots)", fmt, path, placement.num_layers, placement.num_slots)


def load_hint(fmt: str, path: str | Path, placement: Placement, cluster: Cluster) -> str:
    """One line telling how the framework is told to load the file (sizes it must be launched with)."""
    redundant = placement.num_slots - placement.num_experts
    if fmt == "sglang":
        return (f"SGLang: --init-expert-location {path} --ep-size {cluster.num_gpus} "
                f"--ep-num-redundant-experts {redundant}")
    if fmt == "trtllm":
        return (f"TensorRT-LLM: moe_config.load_balancer: {path} in --extra_llm_api_options, with --ep "
                f"{cluster.num_gpus}")
    if fmt == "vllm-ascend":
        return (f"vllm-ascend: --additional-config '{{\"eplb_config\": {{\"expert_map_path\": \"{path}\"}}}}' on "
                f"{cluster.num_gpus} devices ({redundant} redundant experts)")
    if fmt == "eplb":
        return f"EPLB arrays phy2log/log2phy/logcnt for {cluster.num_gpus} GPUs x {cluster.slots_per_gpu} slots"
    return ""


# ---------------------------------------------------------------- readers of our own outputs

def _int_matrix(rows: Any, what: str) -> np.ndarray:
    try:
        array = np.array(rows)
    except ValueError:
        raise ValueError(f"{what} is not a rectangular array of integers") from None
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise ValueError(f"{what} must be a 2-D array of integers, got shape {array.shape} of {array.dtype}")
    return array.astype(np.int64)


def _placement_from_slots(phy2log_LR: np.ndarray, num_experts: int | None, what: str) -> Placement:
    """An even-share placement; num_experts None takes max id + 1 (every expert is in every row of these files)."""
    if phy2log_LR.size == 0:
        raise ValueError(f"{what} holds no slots")
    if phy2log_LR.min() < 0:
        raise ValueError(f"{what} holds a negative expert id {phy2log_LR.min()}")
    if num_experts is None:
        num_experts = int(phy2log_LR.max()) + 1
    check_positive_int(num_experts, f"{what}: num_experts")
    placement = Placement.even(phy2log_LR, num_experts)
    placement.validate()
    return placement


def read_sglang_mapping(path: str | Path, *, first_moe_layer: int = 0,
                        num_experts: int | None = None) -> Placement:
    """physical_to_logical_map of an SGLang .json/.pt file -> Placement (even shares) of rows first_moe_layer on."""
    path = Path(path)
    _check_first_moe_layer(first_moe_layer)
    if path.suffix.lower() == ".pt":
        try:
            import torch
        except ImportError:
            raise ValueError("reading a .pt file needs torch") from None
        data = torch.load(path, weights_only=True)
        data = {key: value.numpy() for key, value in data.items()} if isinstance(data, dict) else data
    else:
        data = json.loads(path.read_text())
    if not isinstance(data, dict) or set(data) != {"physical_to_logical_map"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: SGLang's init_by_mapping takes only physical_to_logical_map, got {keys}")
    rows_MR = _int_matrix(data["physical_to_logical_map"], f"{path}: physical_to_logical_map")
    if first_moe_layer >= rows_MR.shape[0]:
        raise ValueError(f"{path}: {rows_MR.shape[0]} layers, none from first_moe_layer {first_moe_layer} on")
    return _placement_from_slots(rows_MR[first_moe_layer:], num_experts, str(path))


_YAML_LINE = re.compile(r"(\w+):\s*(\d*)\s*")
_YAML_LAYER = re.compile(r"\s+(\d+):\s*\[([\d,\s]*)\]\s*")


def read_trtllm_config(path: str | Path, *, num_experts: int | None = None) -> tuple[Placement, list[int]]:
    """A load-balancer YAML as trtllm_yaml writes it -> (Placement of its layers in id order, their layer ids)."""
    path = Path(path)
    top: dict[str, str] = {}
    layers: dict[int, list[int]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if (match := _YAML_LAYER.fullmatch(line)) is not None:
            layers[int(match.group(1))] = [int(x) for x in match.group(2).split(",") if x.strip()]
        elif (match := _YAML_LINE.fullmatch(line)) is not None:
            top[match.group(1)] = match.group(2)
        else:
            raise ValueError(f"{path}, line {number}: not a line of the load-balancer YAML: {line!r}")
    if "num_slots" not in top or not layers:
        raise ValueError(f"{path}: needs num_slots and initial_global_assignments")
    ids = sorted(layers)
    phy2log_LR = _int_matrix([layers[layer] for layer in ids], f"{path}: initial_global_assignments")
    if phy2log_LR.shape[1] != int(top["num_slots"]):
        raise ValueError(f"{path}: {phy2log_LR.shape[1]} slots per layer, num_slots {top['num_slots']}")
    return _placement_from_slots(phy2log_LR, num_experts, str(path)), ids


def read_vllm_ascend_expert_map(path: str | Path, *, num_experts: int | None = None) -> Placement:
    """A vllm-ascend expert-map JSON -> Placement (even shares), slots of device g at [g*S, (g+1)*S)."""
    path = Path(path)
    data = json.loads(path.read_text())
    try:
        layer_list = data["layer_list"]
        if int(data["moe_layer_count"]) != len(layer_list):
            raise ValueError(f"{path}: moe_layer_count {data['moe_layer_count']} != {len(layer_list)} layers")
        rows = [[e for device in layer["device_list"] for e in device["device_expert"]] for layer in layer_list]
        widths = {len(device["device_expert"]) for layer in layer_list for device in layer["device_list"]}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a vllm-ascend expert map ({exc!r} missing or malformed)") from None
    if len(widths) != 1:
        raise ValueError(f"{path}: devices hold different numbers of experts {sorted(widths)}")
    return _placement_from_slots(_int_matrix(rows, f"{path}: device_expert"), num_experts, str(path))
