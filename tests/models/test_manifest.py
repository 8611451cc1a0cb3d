"""model.toml parsing: the documented keys, nothing else, and clear reasons for problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.models.manifest import ManifestError, parse_manifest

GOOD = """description = "demo"
[model]
architecture = "resnet18"
kwargs = { num_classes = 2 }
weights = "weights.pt"
num_classes = 2
labels = "labels.txt"
[preprocess]
resize = 72
crop = 64
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]
input_shape = [3, 64, 64]
[cam]
target_layers = ["layer3", "layer4"]
fc_layer = "fc"
default_method = "GradCAM"
allowed_methods = ["GradCAM", "ScoreCAM"]
"""


def write(tmp_path: Path, text: str, labels: str = "cat\ndog\n") -> Path:
    folder = tmp_path / "demo"
    folder.mkdir(exist_ok=True)
    (folder / "model.toml").write_text(text)
    (folder / "weights.pt").write_bytes(b"")
    (folder / "labels.txt").write_text(labels)
    return folder


def test_parses_every_key(tmp_path: Path) -> None:
    spec = parse_manifest(write(tmp_path, GOOD))
    assert spec.name == "demo"
    assert spec.architecture == "resnet18"
    assert dict(spec.kwargs) == {"num_classes": 2}
    assert spec.labels == ("cat", "dog")
    assert (spec.resize, spec.crop, spec.input_shape) == (72, (64, 64), (3, 64, 64))
    assert spec.target_layers == ("layer3", "layer4")
    assert spec.fc_layer == "fc"
    assert spec.allowed_methods == ("GradCAM", "ScoreCAM")
    assert spec.weights_path == tmp_path / "demo" / "weights.pt"
    with pytest.raises(AttributeError):
        spec.name = "other"  # frozen


def test_torchvision_weights_name(tmp_path: Path) -> None:
    spec = parse_manifest(write(tmp_path, GOOD.replace('"weights.pt"', '"IMAGENET1K_V1"')))
    assert spec.weights == "IMAGENET1K_V1"
    assert spec.weights_path is None


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("num_classes = 2\n", "num_classes = 2\ncolour = 1\n", "unknown key(s) in [model]: colour"),
        ('weights = "weights.pt"', 'weights = "other.pt"', "other.pt does not exist"),
        ('weights = "weights.pt"', 'weights = "some weights"', "neither a file"),
        ("crop = 64", "crop = 60", "must equal input_shape"),
        ("input_shape = [3, 64, 64]", "input_shape = [4, 64, 64]", "C = 1 or 3"),
        ("std = [0.25, 0.25, 0.25]", "std = [0.25, 0.25]", "std must be a list of 3"),
        ('architecture = "resnet18"\n', "", "architecture is required"),
        ("[cam]", "[cam]\nextra = 1", "unknown key(s) in [cam]"),
        ("num_classes = 2", "num_classes = 3", "has 2 labels but num_classes is 3"),
        ("resize = 72", "resize = 10", "resize must be"),
    ],
)
def test_rejects_with_reason(tmp_path: Path, old: str, new: str, reason: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(write(tmp_path, GOOD.replace(old, new)))
    assert reason in str(caught.value)


def test_missing_and_invalid_toml(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="model.toml is missing"):
        parse_manifest(tmp_path / "empty")
    with pytest.raises(ManifestError, match="not valid TOML"):
        parse_manifest(write(tmp_path, "description = "))


def test_every_problem_is_named_at_once_like_the_settings(tmp_path: Path) -> None:
    text = GOOD.replace("num_classes = 2\n", "num_classes = true\ncolour = 1\n").replace(
        "crop = 64", "crop = 60"
    )
    with pytest.raises(ManifestError) as caught:
        parse_manifest(write(tmp_path, 'flavour = "x"\n' + text))
    assert str(caught.value).split("; ") == [
        "[model] num_classes: Input should be a valid integer (got True)",
        "[preprocess] crop [60, 60] must equal input_shape's H, W [64, 64]",
        "unknown key(s) in [model]: colour",
        "allowed: architecture, kwargs, pretrained, weights, num_classes, labels, compile, "
        "probabilities",
        "unknown top-level key(s): flavour",
        "allowed: description, task, [model], [preprocess], [cam], [detection], "
        "[segmentation], [version_policy]",
    ]


def test_interpolation_and_pretrained_keys(tmp_path: Path) -> None:
    spec = parse_manifest(
        write(tmp_path, GOOD.replace("crop = 64", 'crop = 64\ninterpolation = "bicubic"'))
    )
    assert spec.interpolation == "bicubic" and not spec.pretrained
    with pytest.raises(ManifestError, match="pretrained = true is for timm architectures"):
        parse_manifest(
            write(
                tmp_path, GOOD.replace("num_classes = 2\n", "num_classes = 2\npretrained = true\n")
            )
        )


def test_preprocess_is_required_for_torchvision_models(tmp_path: Path) -> None:
    start, end = GOOD.index("[preprocess]"), GOOD.index("[cam]")
    with pytest.raises(ManifestError, match="only timm models take it from their pretrained"):
        parse_manifest(write(tmp_path, GOOD[:start] + GOOD[end:]))


def test_a_huge_manifest_is_refused_with_the_bound(tmp_path: Path) -> None:
    huge = f'description = "{"x" * 40_000_000}"\n'
    with pytest.raises(
        ManifestError, match=r"model.toml has 40000\d+ bytes; the most allowed is 1048576"
    ):
        parse_manifest(write(tmp_path, huge + GOOD.split("\n", 1)[1]))


def test_a_long_description_is_refused_without_being_echoed(tmp_path: Path) -> None:
    text = GOOD.replace('"demo"', f'"{"y" * 5000}"')
    with pytest.raises(ManifestError) as error:
        parse_manifest(write(tmp_path, text))
    assert "description: String should have at most 4000 characters" in str(error.value)
    assert "(5000 characters)" in str(error.value) and "y" * 100 not in str(error.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("num_classes = 2\n", "num_classes = 10000000000\n", "num_classes: Input should be less"),
        ("[3, 64, 64]", "[3, 100000, 100000]", "input_shape.1: Input should be less than or"),
        ("resize = 72", "resize = 100000", "resize: Input should be less than or equal to 8192"),
        ('["layer3", "layer4"]', str([f"l{i}" for i in range(100)]), "at most 64 items"),
        ('"resnet18"', f'"{"r" * 300}"', "architecture: String should have at most 256"),
        ("{ num_classes = 2 }", f'{{ blob = "{"z" * 20000}" }}', "at most 16384 bytes"),
    ],
)
def test_fields_are_bounded(tmp_path: Path, old: str, new: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(write(tmp_path, GOOD.replace(old, new, 1)))


def test_deeply_nested_toml_is_a_manifest_error(tmp_path: Path) -> None:
    text = GOOD.replace("{ num_classes = 2 }", "[" * 5000 + "]" * 5000)
    with pytest.raises(ManifestError, match="nests arrays or tables too deeply"):
        parse_manifest(write(tmp_path, text))


def test_long_labels_are_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ManifestError, match="label 2 has 2000 characters; the most allowed is 1000"
    ):
        parse_manifest(write(tmp_path, GOOD, labels="cat\n" + "d" * 2000 + "\n"))


def test_timm_kwargs_that_read_files_are_refused(tmp_path: Path) -> None:
    text = GOOD.replace('"resnet18"', '"timm:resnet18"').replace(
        "{ num_classes = 2 }", '{ checkpoint_path = "/etc/passwd" }'
    )
    with pytest.raises(ManifestError, match="checkpoint_path would read files from outside"):
        parse_manifest(write(tmp_path, text))
