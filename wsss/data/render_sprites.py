"""Render the object sprites of the art benchmark: VOC's 20 classes from two open emoji sets.

The sprites are committed (``wsss/data/sprites/CLASS/SET_CODEPOINTS.png``, RGBA, longest
side 128 px, cropped to the drawing), so that the benchmark generates from the repository
alone. This script is for whoever wants to render them again, or from other versions of the
sets. It needs what the generator does not: ``pip install cairosvg fonttools`` (cairosvg
needs the system's libcairo) and the two artwork sets:

- **OpenMoji** (CC BY-SA 4.0): ``npm pack openmoji && tar xzf openmoji-*.tgz`` gives
  ``package/color/svg/``;
- **Noto Color Emoji** (Google; images Apache 2.0, font SIL OFL 1.1): the Debian package
  ``fonts-noto-color-emoji`` (``apt-get download fonts-noto-color-emoji && dpkg-deb -x
  fonts-noto-color-emoji_*.deb noto``) gives ``.../NotoColorEmoji.ttf``, whose glyphs are
  PNG bitmaps (CBDT); emoji sequences (skin tones, ZWJ) are found through its ligatures.

    python -m wsss.data.render_sprites --openmoji package/color/svg \\
        --noto noto/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

No emoji shows a dining table: ``diningtable`` sprites are drawn here (``draw_table``), in
a flat outlined style like OpenMoji's and a shaded one like Noto's. Only these two sets are
used, so that other emoji styles stay unseen, for testing what a model learnt.
"""

from __future__ import annotations

import argparse
import io
import shutil
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SPRITES = Path(__file__).parent / "sprites"
SIZE = 128  # longest side of a sprite, pixels

#: VOC class -> emoji (code points, hex, "-"-joined as OpenMoji names its files). Whole bodies
#: where the sets have them (a dog, not a dog's face); several kinds where they exist.
SKIN_TONES = ("", "-1F3FB", "-1F3FE")
CLASS_EMOJI = {
    "aeroplane": ["2708", "1F6E9", "1F6EB", "1F6EC"],
    "bicycle": ["1F6B2"],
    "bird": ["1F426", "1F986", "1F54A", "1F99C", "1F985", "1F989", "1F9A2", "1F413"],
    "boat": ["26F5", "1F6A4", "1F6E5", "1F6A2", "1F6F6"],
    "bottle": ["1F37E", "1F37C", "1F9F4"],
    "bus": ["1F68C", "1F68E", "1F690"],
    "car": ["1F697", "1F695", "1F699", "1F3CE", "1F693"],
    "cat": ["1F408", "1F408-200D-2B1B"],
    "chair": ["1FA91"],
    "cow": ["1F404", "1F402", "1F403"],
    "diningtable": [],  # drawn: see draw_table
    "dog": ["1F415", "1F429", "1F9AE", "1F415-200D-1F9BA"],
    "horse": ["1F40E"],
    "motorbike": ["1F3CD", "1F6F5"],
    "person": [base + tone for base in ("1F9CD", "1F6B6", "1F3C3") for tone in SKIN_TONES] + ["1F483", "1F57A"],
    "pottedplant": ["1FAB4"],
    "sheep": ["1F411", "1F40F"],
    "sofa": ["1F6CB"],
    "train": ["1F686", "1F682", "1F684", "1F683", "1F688", "1F68B"],
    "tvmonitor": ["1F4FA", "1F5A5"],
}


#: A sprite shows the object alone. These drawings also show water, a runway, rails or a
#: keyboard, which a mask from their alpha would count as the object: left out.
EXCLUDED = {
    "openmoji": {"26F5", "1F6A2", "1F6A4", "1F6E5", "1F686", "1F68B"},  # boats on water; rails under trains
    "noto": {"1F6EB", "1F6EC", "1F686", "1F5A5"},  # planes over a runway; a train on rails; a computer's keyboard
}

#: The couch emoji stands beside a floor lamp: each set's drawing is cut to the couch
#: (left, top, right, bottom, as fractions of the drawing before it is cropped and scaled).
CROPS = {("noto", "1F6CB"): (0.0, 0.475, 1.0, 1.0), ("openmoji", "1F6CB"): (0.0, 0.37, 0.83, 1.0)}


def crop_and_scale(image: Image.Image, size: int = SIZE, box: tuple[float, ...] | None = None) -> Image.Image:
    """The RGBA drawing (cut to the fractional ``box`` first, when given) cropped to its
    visible pixels, its longest side scaled to ``size``."""
    image = image.convert("RGBA")
    if box is not None:
        image = image.crop(tuple(round(f * n) for f, n in zip(box, image.size * 2)))  # size * 2: (w, h, w, h)
    alpha = np.asarray(image)[..., 3]
    ys, xs = np.nonzero(alpha > 8)
    image = image.crop((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    scale = size / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.LANCZOS)


def render_openmoji(folder: Path, codepoints: str) -> Image.Image:
    import cairosvg

    png = cairosvg.svg2png(url=str(folder / f"{codepoints}.svg"), output_width=4 * SIZE, output_height=4 * SIZE)
    return crop_and_scale(Image.open(io.BytesIO(png)), box=CROPS.get(("openmoji", codepoints)))


class NotoFont:
    """The PNG bitmap of an emoji (or emoji sequence) in Noto Color Emoji's CBDT table."""

    def __init__(self, path: Path) -> None:
        from fontTools.ttLib import TTFont

        self.font = TTFont(str(path))
        self.cmap = self.font.getBestCmap()
        self.bitmaps = self.font["CBDT"].strikeData[0]
        self.ligatures: dict[tuple[str, ...], str] = {}
        for lookup in self.font["GSUB"].table.LookupList.Lookup:
            for sub in lookup.SubTable:
                if lookup.LookupType == 7:  # extension: the real subtable inside
                    sub = sub.ExtSubTable
                for first, ligatures in getattr(sub, "ligatures", {}).items():
                    for lig in ligatures:
                        self.ligatures[(first, *lig.Component)] = lig.LigGlyph

    def render(self, codepoints: str) -> Image.Image:
        glyphs = tuple(self.cmap[int(c, 16)] for c in codepoints.split("-"))
        glyph = glyphs[0] if len(glyphs) == 1 else self.ligatures[glyphs]
        bitmap = self.bitmaps[glyph]
        bitmap.ensureDecompiled()
        return crop_and_scale(Image.open(io.BytesIO(bitmap.imageData)), box=CROPS.get(("noto", codepoints)))


def draw_table(style: str, kind: str, size: int = SIZE) -> Image.Image:
    """A dining table seen slightly from above: a top in perspective and its legs, plain
    wood or with a cloth; ``style`` "openmoji" (flat colours, black outline) or "noto"
    (shaded, no outline). Drawn at 4x and scaled down (anti-aliased)."""
    s = 4 * size
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(image)
    wood, dark = ((186, 120, 62), (120, 72, 34)) if style == "noto" else ((210, 150, 90), (150, 100, 60))
    cloth = (236, 64, 64) if kind == "cloth" else None
    line = (0, 0, 0) if style == "openmoji" else None
    width = 10 if style == "openmoji" else 0
    top = [(0.18 * s, 0.30 * s), (0.82 * s, 0.30 * s), (0.98 * s, 0.52 * s), (0.02 * s, 0.52 * s)]
    for x in (0.08, 0.28, 0.72, 0.92):  # legs, the back ones shorter
        back = x in (0.28, 0.72)
        d.rectangle((x * s - 0.025 * s, 0.50 * s, x * s + 0.025 * s, (0.78 if back else 0.95) * s),
                    fill=dark if back else wood, outline=line, width=width)
    if cloth:  # the cloth hangs over the front edge
        d.polygon([(0.02 * s, 0.52 * s), (0.98 * s, 0.52 * s), (0.98 * s, 0.68 * s), (0.02 * s, 0.68 * s)],
                  fill=tuple(int(0.8 * c) for c in cloth), outline=line, width=width)
        d.polygon(top, fill=cloth, outline=line, width=width)
    else:
        d.polygon([(0.02 * s, 0.52 * s), (0.98 * s, 0.52 * s), (0.98 * s, 0.57 * s), (0.02 * s, 0.57 * s)],
                  fill=dark, outline=line, width=width)
        d.polygon(top, fill=wood, outline=line, width=width)
    if style == "noto":  # a soft highlight across the top, blended over it
        shine = Image.new("RGBA", image.size, (0, 0, 0, 0))
        ImageDraw.Draw(shine).polygon([(0.24 * s, 0.32 * s), (0.76 * s, 0.32 * s), (0.70 * s, 0.40 * s),
                                       (0.30 * s, 0.40 * s)], fill=(255, 255, 255, 60))
        image = Image.alpha_composite(image, shine)
    return crop_and_scale(image, size)


LICENCES = {"openmoji": "CC BY-SA 4.0 (LICENSES/CC-BY-SA-4.0.txt)",
            "noto": "Apache 2.0 (LICENSES/Apache-2.0.txt); the font: SIL OFL 1.1 (LICENSES/OFL-1.1.txt)",
            "drawn": "MIT, like this repository (drawn by wsss/data/render_sprites.py)"}

README = """# Object sprites of the art benchmark

RGBA PNGs, longest side {size} px, one folder per PASCAL VOC class, written by
`python -m wsss.data.render_sprites` (its docstring says how to render them again).
The generator (wsss/data/synth.py) reads them; nothing here is downloaded at run time.

Attribution:
- files `openmoji_*.png`: All emojis designed by [OpenMoji](https://openmoji.org/), the
  open-source emoji and icon project (version 17.0.0, npm package `openmoji`). License:
  [CC BY-SA 4.0](https://creativecommons.org/licenses/by-sa/4.0/). Changes: rendered from
  SVG, cropped to the drawing (the couch also cut away from its floor lamp), scaled. These
  adapted images are shared under the same licence.
- files `noto_*.png`: [Noto Color Emoji](https://github.com/googlefonts/noto-emoji),
  Copyright 2013-2017 Google Inc. (Debian package `fonts-noto-color-emoji` 2.042). Images
  under the Apache License 2.0; the font under the SIL Open Font License 1.1. Changes: the
  glyph bitmaps cropped to the drawing (the couch also cut away from its floor lamp), scaled.
- files `*_drawn-*.png` (dining tables, which no emoji shows): drawn by the render script;
  MIT, like this repository.

| class | file | emoji | licence |
|---|---|---|---|
"""


def emoji_name(codepoints: str) -> str:
    """"1F415-200D-1F9BA" -> "DOG + SAFETY VEST" (joiners, selectors and skin tones named briefly)."""
    names = []
    for c in codepoints.split("-"):
        char = chr(int(c, 16))
        if c not in ("200D", "FE0F"):
            names.append(unicodedata.name(char, c).replace("EMOJI MODIFIER FITZPATRICK ", "SKIN TONE "))
    return " + ".join(names)


def write_readme(out: Path) -> None:
    rows = []
    for png in sorted(out.glob("*/*.png")):
        style, _, codepoints = png.stem.partition("_")
        drawn = codepoints.startswith("drawn")
        rows.append(f"| {png.parent.name} | {png.parent.name}/{png.name} | "
                    f"{'dining table (' + codepoints[6:] + ')' if drawn else emoji_name(codepoints).lower()} | "
                    f"{LICENCES['drawn' if drawn else style]} |")
    (out / "README.md").write_text(README.format(size=SIZE) + "\n".join(rows) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--openmoji", type=Path, required=True, help="OpenMoji's color/svg folder")
    parser.add_argument("--noto", type=Path, required=True, help="NotoColorEmoji.ttf")
    parser.add_argument("--out", type=Path, default=SPRITES)
    args = parser.parse_args(argv)
    noto = NotoFont(args.noto)
    for name, emoji in CLASS_EMOJI.items():
        folder = args.out / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for codepoints in emoji:
            for style, render in (("openmoji", lambda c: render_openmoji(args.openmoji, c)), ("noto", noto.render)):
                if codepoints not in EXCLUDED[style]:
                    render(codepoints).save(folder / f"{style}_{codepoints}.png", optimize=True)
        if name == "diningtable":
            for style in ("openmoji", "noto"):
                for kind in ("wood", "cloth"):
                    draw_table(style, kind).save(folder / f"{style}_drawn-{kind}.png", optimize=True)
        print(f"{name:12s} {len(list(folder.glob('*.png')))} sprites")
    write_readme(args.out)


if __name__ == "__main__":
    main()
