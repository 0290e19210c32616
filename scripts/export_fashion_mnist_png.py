"""Write Fashion-MNIST (the IDX files load_dataset finds) as a folder of PNG files, for the
image-folder benchmark and accuracy check in BENCHMARKS.md:

    python scripts/export_fashion_mnist_png.py OUT_DIR    # OUT_DIR/train/<k>-<class>/<i>.png, OUT_DIR/test/...

Class folders are named '<label>-<class name>', so their sorted order is the label order, and
the folder's labels equal the IDX files'. Then it reads the folder back through
cnn_gpu.data.load_image_folder and checks that every image and label equals the IDX arrays'.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from cnn_gpu.data import load_dataset, load_image_folder


def main(out: Path) -> int:
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", split)
        names = [f"{k}-{name.replace('/', '_')}" for k, name in enumerate(ds.class_names)]
        for k, name in enumerate(names):
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(ds.images, ds.labels)):
            path = out / split / names[label] / f"{i:05d}.png"
            if not path.exists():
                Image.fromarray(image[..., 0], mode="L").save(path)
    folder = load_image_folder(out)
    print(folder.describe())
    for split, part in (("train", folder.train), ("test", folder.test)):
        ds = load_dataset("fashion-mnist", split)
        # The folder lists class by class, file by file; the file name is the IDX index.
        index = np.array([int(Path(p).stem) for p in folder.split_paths(split)])
        same_pixels = np.array_equal(np.asarray(part.images), ds.images[index])
        same_labels = np.array_equal(part.labels, ds.labels[index])
        print(f"{split}: {len(index)} images; pixels equal to the IDX files: {same_pixels}; labels: {same_labels}")
        if not (same_pixels and same_labels and len(index) == len(ds.labels)):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
