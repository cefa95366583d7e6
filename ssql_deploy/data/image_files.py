"""Image folders whose every file is checked to be an image before any training starts.

A file that is not an image (`notreally.jpg` holding text, a stray `.DS_Store` renamed) would
otherwise stop an epoch halfway with PIL's UnidentifiedImageError. Such files are refused, not
skipped: skipping would silently change the class counts a user thinks they trained on. The
check reads only each file's header (PIL opens lazily), so a 100k-image tree costs seconds; a
file whose header is fine but whose pixels are truncated is named when it fails to decode.
"""

from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from torchvision import datasets as tvd

from ssql_deploy.errors import UserError
from ssql_deploy.progress import progress_bar

_SHOWN = 3


def _load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"image {path} cannot be decoded ({exc})", "replace or remove that file") from None


def _unreadable(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed on open; size proves it described an image
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        return f"{path} ({type(exc).__name__})"
    return None


def checked_image_folder(folder: Path, transform: Any) -> tvd.ImageFolder:
    dataset = tvd.ImageFolder(str(folder), transform=transform, loader=_load_rgb)
    bad = []
    with progress_bar() as bar:
        task = bar.add_task(f"checking images in {folder.name}/", total=len(dataset.samples))
        for path, _ in dataset.samples:
            if (problem := _unreadable(path)) is not None:
                bad.append(problem)
            bar.advance(task)
    if bad:
        more = f" and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
        raise UserError(
            f"{len(bad)} file{'s' if len(bad) > 1 else ''} under {folder} {'are' if len(bad) > 1 else 'is'} not a readable image: "
            f"{', '.join(bad[:_SHOWN])}{more}",
            "remove or move them out of the class folders (they are refused before training rather than skipped)",
        )
    return dataset
