"""The committed object sprites of the art benchmark: every VOC class drawn in both artwork
styles, each file usable (RGBA, cropped, about 128 px) and credited with its licence."""


import numpy as np
from PIL import Image

from wsss.classes import VOC_CLASSES
from wsss.data.render_sprites import CLASS_EMOJI, EXCLUDED, SIZE, SPRITES, emoji_name


def test_every_voc_class_has_sprites_of_both_styles():
    assert tuple(CLASS_EMOJI) == VOC_CLASSES
    for name in VOC_CLASSES:
        styles = {p.name.split("_")[0] for p in (SPRITES / name).glob("*.png")}
        assert styles == {"openmoji", "noto"}, name
    expected = {f"{c}/{style}_{e}.png" for c, emoji in CLASS_EMOJI.items() for e in emoji
                for style in ("openmoji", "noto") if e not in EXCLUDED[style]}
    found = {f"{p.parent.name}/{p.name}" for p in SPRITES.glob("*/*.png")}
    assert found - {f for f in found if "_drawn-" in f} == expected
    assert len([f for f in found if f.startswith("person/")]) >= 10  # the most common class, the most variety


def test_sprites_are_cropped_rgba_of_the_set_size():
    for png in SPRITES.glob("*/*.png"):
        image = Image.open(png)
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        assert image.mode == "RGBA" and max(image.size) == SIZE, png
        assert (alpha[0] > 8).any() and (alpha[-1] > 8).any() and (alpha[:, 0] > 8).any() and \
            (alpha[:, -1] > 8).any(), f"{png} is not cropped to its drawing"
        assert (alpha > 128).mean() > 0.15, f"{png} is nearly empty"


def test_each_file_is_credited_and_the_licences_are_there():
    readme = (SPRITES / "README.md").read_text()
    for png in SPRITES.glob("*/*.png"):
        assert f"| {png.parent.name}/{png.name} |" in readme, png
    for licence in ("CC-BY-SA-4.0.txt", "Apache-2.0.txt", "OFL-1.1.txt"):
        assert (SPRITES / "LICENSES" / licence).stat().st_size > 3000
    assert "All emojis designed by [OpenMoji]" in readme
    assert emoji_name("1F415-200D-1F9BA") == "DOG + SAFETY VEST"
