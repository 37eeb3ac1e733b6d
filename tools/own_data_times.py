"""Start-up costs of the own-data readers, the figures in docs/downstream.md "Your own data":

    python tools/own_data_times.py [--masks 1000] [--images 1000] [--coco-images 0]

- folder_seg's mask scan at build (`folder_seg.scan_masks`): N masks of 128x96 and of 512x512, seconds;
- coco_det's header check of the listed images against the JSON (`coco_det._check_image_files`): N 640x480 JPEGs,
  microseconds an image (page cache warm: the files were just written);
- with --coco-images N: parsing a generated COCO JSON of N images and ~7 annotations each (`coco_det.load_split`),
  seconds and peak RSS of the parsing process (COCO train: 118287 images, 860001 annotations; ru_maxrss).
Prints one JSON line. Files go to a temp folder, removed at the end.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rs_transfer.downstream import coco_det, folder_seg


def mask_scan_seconds(root: Path, count: int, size: tuple) -> float:
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(count):
        image, mask = root / f"i{i}.jpg", root / f"m{i}.png"
        Image.new("RGB", size[::-1]).save(image)
        Image.fromarray(rng.integers(0, 4, size, dtype=np.uint8)).save(mask)
        pairs.append((image, mask))
    start = time.perf_counter()
    folder_seg.scan_masks(pairs)
    return time.perf_counter() - start


def header_check_us(root: Path, count: int) -> float:
    Image.new("RGB", (640, 480)).save(root / "0.jpg")
    for i in range(1, count):
        (root / f"{i}.jpg").hardlink_to(root / "0.jpg")
    files = np.array([f"{i}.jpg" for i in range(count)])
    start = time.perf_counter()
    coco_det._check_image_files(root, files, np.arange(count), np.tile([480, 640], (count, 1)), root / "x.json")
    return (time.perf_counter() - start) / count * 1e6


def coco_parse(root: Path, count: int) -> dict:
    rng = np.random.default_rng(0)
    images = [{"id": i, "file_name": "0.jpg", "height": 480, "width": 640} for i in range(count)]
    annotations = [{"id": k, "image_id": int(i), "category_id": int(rng.integers(1, 81)), "iscrowd": 0,
                    "bbox": [10.5, 20.25, 100.0, 80.0], "area": 8000.0}
                   for k, i in enumerate(rng.integers(0, count, 7 * count))]
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": f"c{c}"} for c in range(1, 81)]}))
    (root / "img").mkdir()
    Image.new("RGB", (640, 480)).save(root / "img" / "0.jpg")
    written = {"coco_images": count, "coco_annotations": len(annotations), "coco_json_mb": path.stat().st_size / 2**20}
    del images, annotations
    # parsed in a fresh process: its peak RSS is the parse's (with the package imported), not the generator's
    code = ("import json, resource, sys, time\nfrom pathlib import Path\nfrom rs_transfer.downstream import coco_det\n"
            "start = time.perf_counter()\ncoco_det.load_split(Path(sys.argv[1]), Path(sys.argv[2]))\n"
            "print(json.dumps({'coco_parse_s': time.perf_counter() - start,"
            " 'coco_peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))")
    parsed = subprocess.run([sys.executable, "-c", code, str(path), str(root / "img")], capture_output=True, text=True,
                            check=True).stdout
    return {**written, **json.loads(parsed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=int, default=1000)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--coco-images", type=int, default=0)
    args = parser.parse_args()
    result = {}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for size in ((96, 128), (512, 512)):
            (folder / f"m{size[0]}").mkdir()
            result[f"mask_scan_s_{size[1]}x{size[0]}"] = mask_scan_seconds(folder / f"m{size[0]}", args.masks, size)
        (folder / "h").mkdir()
        result["header_check_us_per_image"] = header_check_us(folder / "h", args.images)
        if args.coco_images:
            (folder / "c").mkdir()
            result.update(coco_parse(folder / "c", args.coco_images))
    print(json.dumps({"masks": args.masks, "images": args.images, **result}))


if __name__ == "__main__":
    main()
