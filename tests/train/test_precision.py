"""precision=auto: bf16 only where it is fast, and never for convolutions whose bf16 CPU gradients break."""

import pytest
import torch

import vitkit
from vitkit.train import bf16_cpu_conv_hazard, bf16_is_fast, resolve_precision

CPU = torch.device("cpu")


def test_a_resnet_whose_last_stage_sees_one_pixel_is_flagged_only_at_that_size():
    cnn = vitkit.create_model("test_resnet", num_classes=10)
    assert bf16_cpu_conv_hazard(cnn, (16, 16)) == "layer4.0.conv1"  # 16 px: 1x1 input, 3x3 kernel, stride 2
    assert bf16_cpu_conv_hazard(cnn, (32, 32)) is None
    assert cnn.training  # the probe leaves the mode as it found it


@pytest.mark.parametrize("name", ["vitkit_micro_p4_16", "vit_tiny_patch16_224"])
def test_vits_have_no_hazard_patchify_convs_never_see_less_than_a_patch(name):
    assert bf16_cpu_conv_hazard(vitkit.create_model(name, num_classes=10)) is None


def test_auto_resolves_to_fp32_for_the_hazard_and_follows_the_hardware_otherwise():
    cnn = vitkit.create_model("test_resnet", num_classes=10)
    vit = vitkit.create_model("vitkit_micro_p4_16", num_classes=10)
    fast = "bf16" if bf16_is_fast(CPU) else "fp32"
    assert resolve_precision("auto", CPU, cnn, (16, 16)) == "fp32"
    assert resolve_precision("auto", CPU, cnn, (32, 32)) == fast
    assert resolve_precision("auto", CPU, vit) == fast
    assert resolve_precision("bf16", CPU, cnn, (16, 16)) == "bf16"  # an explicit choice is kept
