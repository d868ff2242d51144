"""The engine cost model of `agentcg kv simulate`: step times and transfer bandwidths.

A step (one iteration of continuous batching) takes

    step_fixed_s + token_s·(tokens scheduled) + prefill_attn_s_per_token_pos·(sum over
    prefill tokens of their position) + decode_kv_read_s_per_token·(sum over decoding
    sequences of their context length)

Presets are for Llama-3-8B in bf16 (16.06 GB of weights, 128 KiB of KV per token)
derived from each GPU's datasheet figures with stated efficiencies, not measured:
GEMMs at 50 % of dense bf16 peak, attention at 40 %, HBM reads at 80 %, PCIe copies of
pinned memory at 80 % of the link, 1 ms of scheduling and launch per step. A measured
model (`agentcg gpu bench` output, or any JSON with these field names) replaces them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from agentcg.engine_protocol import LLAMA3_8B_BF16, ComputeCost
from agentcg.errors import InvalidInput

MODEL_PARAMS = 8.03e9
WEIGHT_BYTES = 16.06e9
ATTN_FLOPS_PER_TOKEN_POS = 4 * 32 * 32 * 128      # QK^T and AV: 2 GEMMs x 2 flops x layers x q-heads x dim
GEMM_EFFICIENCY, ATTN_EFFICIENCY, HBM_EFFICIENCY, PCIE_EFFICIENCY = 0.5, 0.4, 0.8, 0.8
STEP_OVERHEAD_S = 1e-3


@dataclass(frozen=True)
class GpuSpec:
    name: str
    hbm_bytes_per_s: float
    bf16_flops: float          # dense
    pcie_bytes_per_s: float    # per direction, theoretical
    source: str


GPUS: dict[str, GpuSpec] = {
    "h200": GpuSpec("h200", 4.8e12, 989e12, 64e9, "NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, 989 TFLOPS bf16 dense; PCIe 5.0 x16"),
    "h100": GpuSpec("h100", 3.35e12, 989e12, 64e9, "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOPS bf16 dense; PCIe 5.0 x16"),
    "a100": GpuSpec("a100", 2.039e12, 312e12, 32e9, "NVIDIA A100 80GB SXM datasheet: 2.039 TB/s HBM2e, 312 TFLOPS bf16; PCIe 4.0 x16"),
    "l40s": GpuSpec("l40s", 0.864e12, 362e12, 32e9, "NVIDIA L40S datasheet: 864 GB/s GDDR6, 362 TFLOPS bf16 dense; PCIe 4.0 x16"),
}

# A PCIe 4.0 NVMe data-centre SSD (e.g. Samsung PM9A3 class): about 6.5 GB/s read, 4 GB/s write.
SSD_READ_BYTES_PER_S = 6.0e9
SSD_WRITE_BYTES_PER_S = 4.0e9


@dataclass(frozen=True)
class EngineModel:
    cost: ComputeCost
    bytes_per_token: int
    d2h_bytes_per_s: float
    h2d_bytes_per_s: float
    ssd_write_bytes_per_s: float
    ssd_read_bytes_per_s: float
    source: str


def gpu_preset(name: str) -> EngineModel:
    spec = GPUS.get(name.lower())
    if spec is None:
        raise InvalidInput(f"unknown GPU {name!r}; presets: {', '.join(GPUS)}; or pass --cost-model FILE.json")
    bpt = LLAMA3_8B_BF16.bytes_per_token
    cost = ComputeCost(
        step_fixed_s=WEIGHT_BYTES / (spec.hbm_bytes_per_s * HBM_EFFICIENCY) + STEP_OVERHEAD_S,
        token_s=2 * MODEL_PARAMS / (spec.bf16_flops * GEMM_EFFICIENCY),
        prefill_attn_s_per_token_pos=ATTN_FLOPS_PER_TOKEN_POS / (spec.bf16_flops * ATTN_EFFICIENCY),
        decode_kv_read_s_per_token=bpt / (spec.hbm_bytes_per_s * HBM_EFFICIENCY),
    )
    pcie = spec.pcie_bytes_per_s * PCIE_EFFICIENCY
    return EngineModel(cost, bpt, pcie, pcie, SSD_WRITE_BYTES_PER_S, SSD_READ_BYTES_PER_S,
                       f"{spec.source} (Llama-3-8B bf16; derived with stated efficiencies, not measured)")


def load_engine_model(path: str | Path) -> EngineModel:
    """A JSON object with the fields of ComputeCost plus bytes_per_token and the four
    bandwidths (bytes/s); `source` optional."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read the cost model ({exc.strerror})") from None
    except ValueError as exc:
        raise InvalidInput(f"{path}: the cost model is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{path}: the cost model must be a JSON object")
    cost_names = {f.name for f in fields(ComputeCost)}
    other = ("bytes_per_token", "d2h_bytes_per_s", "h2d_bytes_per_s", "ssd_write_bytes_per_s", "ssd_read_bytes_per_s")
    required = [f.name for f in fields(ComputeCost) if f.name not in ("max_batched_tokens", "max_running")]
    missing = [n for n in (*required, *other) if n not in data]
    if missing:
        raise InvalidInput(f"{path}: the cost model lacks {', '.join(missing)}")
    for name in (*cost_names, *other):
        value = data.get(name)
        if name in data and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise InvalidInput(f"{path}: {name} must be a positive number, got {value!r}")
    cost = ComputeCost(**{k: data[k] for k in cost_names if k in data})
    return EngineModel(cost, int(data["bytes_per_token"]), *(float(data[k]) for k in other[1:]),
                       source=str(data.get("source", f"measured ({path})")))


def engine_model_dict(model: EngineModel) -> dict:
    return {**asdict(model.cost), **{k: v for k, v in asdict(model).items() if k != "cost"}}
