"""``model_input_size`` on timm's hybrid (CNN + ViT) embeddings, whose ``proj`` sees CNN features."""

from vitkit.models import create_model, model_input_size


def test_hybrid_embedding_reports_pixel_channels():
    model = create_model("vit_small_r26_s32_224", num_classes=10, img_size=64)
    assert model.patch_embed.proj.in_channels != 3  # the trap: proj reads backbone features
    assert model_input_size(model) == (3, 64, 64)


def test_plain_patch_embedding_unchanged():
    assert model_input_size(create_model("vitkit_nano_p4_16", num_classes=10, in_chans=1)) == (1, 16, 16)
