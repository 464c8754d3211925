"""Adaptation: parameter-efficient transforms (LoRA, LoRA-QV, VPT, DVPT, ExPLoRA), fine-tuning from a
pretrained run, and linear / kNN probes on frozen features."""

from vitkit.adapt.common import ParameterCount, parameter_count, trainable_names
from vitkit.adapt.dvpt import DVPTConfig, apply_dvpt
from vitkit.adapt.explora import ExploraConfig, apply_explora
from vitkit.adapt.lora import LoRAConfig, LoRAQVConfig, apply_lora, apply_lora_qv, merge_lora
from vitkit.adapt.probes import ProbeConfig, ProbeResult, extract_features, measure_probe, probe_run
from vitkit.adapt.vpt import VPTConfig, apply_vpt

__all__ = [
    "DVPTConfig",
    "ExploraConfig",
    "LoRAConfig",
    "LoRAQVConfig",
    "ParameterCount",
    "ProbeConfig",
    "ProbeResult",
    "VPTConfig",
    "apply_dvpt",
    "apply_explora",
    "apply_lora",
    "apply_lora_qv",
    "apply_vpt",
    "extract_features",
    "measure_probe",
    "merge_lora",
    "parameter_count",
    "probe_run",
    "trainable_names",
]
