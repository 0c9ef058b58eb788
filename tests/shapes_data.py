"""A tiny COCO-format data set of coloured squares on noise, written by the tests."""
import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = [(230, 40, 40), (40, 200, 40), (40, 80, 230), (240, 220, 40)]


def write_shapes(root: Path, num_images: int = 4, size: int = 96, seed: int = 0,
                 num_classes: int = 4, max_objects: int = 2) -> tuple[Path, Path]:
    """Images with 1..max_objects solid squares; class = colour. Returns (images dir, json)."""
    rng = np.random.default_rng(seed)
    images_dir = Path(root) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        for _ in range(rng.integers(1, max_objects + 1)):
            s = int(rng.integers(size // 5, size // 2))
            x, y = (int(v) for v in rng.integers(0, size - s, 2))
            c = int(rng.integers(0, num_classes))
            pixels[y:y + s, x:x + s] = COLORS[c]
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": c + 1,
                                "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
        name = f"{i:04d}.png"
        Image.fromarray(pixels).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    ann = Path(root) / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return images_dir, ann
