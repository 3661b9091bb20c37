"""The converted classifier's pipeline against the source's own: the image processor reproduces the source's
preprocessing (resize, center crop, resampling, mean and std), so both give the same top-5 on real photos."""

import pytest
import torch
from test_conversion import TINY, randomize
from test_conversion_vision_towers import TEXT, VISION
from transformers import (
    AutoImageProcessor,
    BitImageProcessorPil,
    CLIPConfig,
    CLIPForImageClassification,
    CLIPImageProcessorPil,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTImageProcessorPil,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipImageProcessorPil,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    pipeline,
)
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from cropr.conversion import from_backbone
from cropr.data.images import SAMPLE_PHOTOS, sample_photo

LABELS = {index: name for index, name in enumerate("ant bee cat dog eel fox gnu hen ibis jay".split())}
HEAD = dict(id2label=LABELS, label2id={name: index for index, name in LABELS.items()})
IMAGENET = dict(image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD)
# The Hub checkpoints' preprocessing, scaled from 224 px models to these 32 px ones (256 -> 37 before a 224 -> 32 crop).
DEIT_PROCESSOR = dict(size={"height": 37, "width": 37}, crop_size=32, **IMAGENET)
DINOV2_PROCESSOR = dict(
    size={"shortest_edge": 37}, do_center_crop=True, crop_size=32, resample=PILImageResampling.BICUBIC, **IMAGENET
)

# (source classifier, its image processor, from_backbone keyword arguments)
SOURCES = {
    # google/vit-base-patch16-224: a plain resize to 224, bilinear, mean/std 0.5.
    "vit": (
        lambda: ViTForImageClassification(ViTConfig(intermediate_size=64, **TINY, **HEAD)),
        lambda: ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        {},
    ),
    # facebook/deit-*: resize to 256x256, crop 224, bicubic, ImageNet mean/std.
    "deit": (
        lambda: DeiTForImageClassification(DeiTConfig(intermediate_size=64, **TINY, **HEAD)),
        lambda: DeiTImageProcessorPil(**DEIT_PROCESSOR),
        {},
    ),
    "deit_distilled": (
        lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(intermediate_size=64, **TINY, **HEAD)),
        lambda: DeiTImageProcessorPil(**DEIT_PROCESSOR),
        {},
    ),
    # facebook/dinov2-*-imagenet1k-1-layer: shortest edge 256, crop 224, bicubic; the config says 518 px (here 64),
    # so the conversion is asked for the size the processor crops to.
    "dinov2": (
        lambda: Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, **{**TINY, "image_size": 64}, **HEAD)),
        lambda: BitImageProcessorPil(**DINOV2_PROCESSOR),
        {"image_size": 32},
    ),
    "dinov2_with_registers": (
        lambda: Dinov2WithRegistersForImageClassification(
            Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=2, **{**TINY, "image_size": 64}, **HEAD)
        ),
        lambda: BitImageProcessorPil(**DINOV2_PROCESSOR),
        {"image_size": 32},
    ),
    # openai/clip-vit-*: shortest edge 224, crop 224, bicubic, CLIP mean/std.
    "clip": (
        lambda: CLIPForImageClassification(CLIPConfig(vision_config=VISION, text_config=TEXT, **HEAD)),
        lambda: CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32),
        {},
    ),
    # google/siglip-*: a plain resize, bicubic, mean/std 0.5.
    "siglip": (
        lambda: SiglipForImageClassification(SiglipConfig(vision_config=VISION, text_config=TEXT, **HEAD)),
        lambda: SiglipImageProcessorPil(size={"height": 32, "width": 32}, resample=PILImageResampling.BICUBIC),
        {},
    ),
}


# CLIP's classifier reads the post-LayerNorm pooling, whose random logits saturate the softmax unless scaled down.
CLASSIFIER_SCALE = {"clip": 0.25}


def saved_source(family: str, directory) -> None:
    model_factory, processor_factory, _ = SOURCES[family]
    model = randomize(model_factory())
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("classifier"):
                module.weight.mul_(CLASSIFIER_SCALE.get(family, 1.0))
    model.save_pretrained(directory)
    processor_factory().save_pretrained(directory)


@pytest.mark.parametrize("family", list(SOURCES))
def test_converted_pipeline_gives_the_sources_top5_on_photos(family, tmp_path):
    pytest.importorskip("skimage", reason="the sample photos come with scikit-image")
    saved_source(family, tmp_path / "source")
    model, processor = from_backbone(tmp_path / "source", token_selector="none", **SOURCES[family][2])
    model.save_pretrained(tmp_path / "converted")
    processor.save_pretrained(tmp_path / "converted")
    source_pipeline = pipeline("image-classification", model=str(tmp_path / "source"))
    converted_pipeline = pipeline("image-classification", model=str(tmp_path / "converted"))
    assert type(source_pipeline.image_processor) is type(AutoImageProcessor.from_pretrained(tmp_path / "source"))
    for name in SAMPLE_PHOTOS:
        photo = sample_photo(name)
        expected = source_pipeline(photo, top_k=5)
        actual = converted_pipeline(photo, top_k=5)
        scores = [prediction["score"] for prediction in expected]
        # Well apart, so that the ranking is the model's, not rounding's, and no score is saturated.
        assert min(a - b for a, b in zip(scores[:-1], scores[1:], strict=True)) > 2e-4 and scores[-1] > 1e-3
        assert [prediction["label"] for prediction in actual] == [prediction["label"] for prediction in expected]
        assert [prediction["score"] for prediction in actual] == pytest.approx(scores, abs=1e-4)


def test_crop_follows_the_converted_size_and_the_task(tmp_path):
    saved_source("deit", tmp_path)
    # At twice the size, the resize before the crop doubles too: the same share of the image is kept.
    _, processor = from_backbone(tmp_path, token_selector="none", image_size=64)
    assert processor.size == {"height": 74, "width": 74} and processor.crop_size == {"height": 64, "width": 64}
    assert processor.do_center_crop and processor.resample == PILImageResampling.BICUBIC
    # Labels and masks cover the whole image: no crop for multi-label classification and segmentation, nor when
    # asked.
    for task, options in (
        ("multi-label-classification", {}),
        ("semantic-segmentation", {}),
        (None, {"center_crop": False}),
    ):
        task_kwargs = {"task": task, "num_labels": 2} if task else {}
        _, processor = from_backbone(tmp_path, token_selector="none", **task_kwargs, **options)
        assert processor.size == {"height": 32, "width": 32} and not processor.do_center_crop
        assert list(processor.image_mean) == list(IMAGENET_DEFAULT_MEAN)
    with pytest.raises(ValueError, match="`center_crop=True` is not supported for semantic segmentation"):
        from_backbone(tmp_path, "semantic-segmentation", num_labels=2, center_crop=True)


def test_default_size_is_the_source_processors_crop(tmp_path):
    """A DINOv2 classifier's config says 518 px while its processor crops 224, the size its pipeline runs at."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2ForImageClassification

    from cropr import from_backbone

    config = Dinov2Config(
        image_size=56,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    Dinov2ForImageClassification(config).save_pretrained(tmp_path / "dinov2")
    BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "dinov2"
    )
    model, processor = from_backbone(str(tmp_path / "dinov2"), "image-classification", token_selector="none")
    assert model.config.image_size_hw == (32, 32) and processor.crop_size == {"height": 32, "width": 32}
    model, processor = from_backbone(
        str(tmp_path / "dinov2"), "multi-label-classification", num_labels=3, token_selector="none"
    )
    assert model.config.image_size_hw == (56, 56) and processor.size == {"height": 56, "width": 56}
