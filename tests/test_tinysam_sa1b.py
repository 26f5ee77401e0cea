"""TinySAM distillation and the teacher embedding cache on real-image folders: SA-1B (official
per-image JSON, COCO RLE masks) and COCO instances, read lazily through one image list shared by
``sam cache-embeddings`` and ``sam distill``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Crash, crash_on_call
from safetensors.torch import load_file

from slimkit.cli import main
from slimkit.core.errors import SlimkitError
from slimkit.sam.tinysam.train import DistillConfig, SamDistillTask, distill_sam, tiny_teacher
from slimkit.train import Trainer
from slimkit.train.card import read_metrics

H, W = 96, 128  # letterboxed to vit_mini's 256 px: 192 x 256, rows 192.. are padding


@pytest.fixture(autouse=True)
def fresh_console_log():
    """Each CLI call gets its own console handler (as tests/test_bad_input.py)."""
    logger = logging.getLogger("slimkit")
    for h in [h for h in logger.handlers if getattr(h, "_slimkit_console", False)]:
        logger.removeHandler(h)
    yield


def rle_encode(m: np.ndarray) -> dict:
    """COCO compressed RLE from its definition: run lengths over the column-major pixels starting
    with a run of zeros; from the third on, each stored minus the one two before; each value in
    5-bit chunks, low first, +48, 0x20 = another chunk follows, 0x10 of the last = sign."""
    flat = m.T.reshape(-1).astype(bool)
    counts, val, run = [], False, 0
    for v in flat:
        if v != val:
            counts.append(run)
            val, run = v, 0
        run += 1
    counts.append(run)
    s = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            s.append(chr(c + (0x20 if more else 0) + 48))
    return {"size": [int(m.shape[0]), int(m.shape[1])], "counts": "".join(s)}


def _masks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(15, H - 15), rng.uniform(15, W - 15)
        ry, rx = rng.uniform(6, 14), rng.uniform(6, 20)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        m[int(cy), int(cx) - 2] = False  # a hole: more than one run per column
        out.append(m)
    return out


def write_sa1b(d: Path, stems=("sa_1", "sa_2", "sa_10"), seed=0, n=5) -> dict[str, list]:
    """An SA-1B folder in the official layout; returns the masks written per image."""
    from PIL import Image

    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for k, stem in enumerate(stems):
        masks = _masks(rng, n)
        img = np.full((H, W, 3), 90 + 20 * k, np.uint8)
        for m in masks:
            img[m] = rng.integers(0, 255, 3)
        Image.fromarray(img).save(d / f"{stem}.jpg", quality=95)
        anns = []
        for j, m in enumerate(masks):
            ys, xs = np.nonzero(m)
            anns.append({"id": j, "segmentation": rle_encode(m), "area": int(m.sum()),
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1,
                                  int(np.ptp(ys)) + 1],
                         "point_coords": [[float(xs.mean()), float(ys.mean())]],
                         "predicted_iou": 0.9, "stability_score": 0.95,
                         "crop_box": [0, 0, W, H]})  # fmt: skip
        info = {"image_id": int(stem.split("_")[1]), "file_name": f"{stem}.jpg", "width": W,
                "height": H}  # fmt: skip
        (d / f"{stem}.json").write_text(json.dumps({"image": info, "annotations": anns}))
        written[stem] = masks
    return written


def _cfg(tmp_path, data: str, **kw) -> DistillConfig:
    base = dict(teacher=str(tiny_teacher(tmp_path / "teacher")), data=data, batch_size=2,
                prompts_per_image=2, val_scenes=1, device="cpu")  # fmt: skip
    return DistillConfig(**(base | kw))


def _task(tmp_path, data: str, **kw) -> SamDistillTask:
    return SamDistillTask(_cfg(tmp_path, data, **kw), torch.device("cpu"))


def refused(capsys, args: list[str], message: str) -> None:
    """The CLI exits 2 with exactly one error line holding ``message``."""
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and err.count("error:") == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------- reader


def test_rle_encoder_and_letterboxed_sa1b_samples(tmp_path):
    # catches: masks not transformed with their image (resize + bottom-right padding), the
    # images of a folder in another order than sa_1, sa_2, sa_10, and this file's own RLE
    # encoder disagreeing with COCO's (pycocotools, where installed)
    from slimkit.sam.coco import letterbox
    from slimkit.sam.sa1b import decode_rle
    from slimkit.sam.tinysam.data import Sa1bFolder

    written = write_sa1b(tmp_path / "sa1b")
    m = written["sa_1"][0]
    assert np.array_equal(decode_rle(rle_encode(m)), m)
    try:
        from pycocotools import mask as mu
    except ImportError:
        mu = None
    if mu is not None:
        assert (
            rle_encode(m)["counts"]
            == mu.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        )
    src = Sa1bFolder(tmp_path / "sa1b", 256)
    assert src.ids == ["sa_1", "sa_2", "sa_10"] and len(src) == 3
    from PIL import Image

    img, masks, extent = src.sample(2)
    ref_img, ref_masks = letterbox(Image.open(tmp_path / "sa1b" / "sa_10.jpg").convert("RGB"),
                                   written["sa_10"], 256)  # fmt: skip
    assert extent == (192, 256) and np.array_equal(img, ref_img) and not img[192:].any()
    assert len(masks) == 5 and masks.decoded == 0  # nothing decoded before it is asked for
    assert all(np.array_equal(masks[k], ref_masks[k]) for k in range(5))


# ---------------------------------------------------------------- cache


def test_cache_ids_follow_the_folder_and_a_cache_for_another_folder_is_refused(
    tmp_path, one_thread
):
    # catches: a cache whose rows are not the folder's images in list order, cached targets
    # that differ from the teacher's embeddings of the letterboxed images, and a fingerprint
    # that does not cover the image list (a cache of another folder, or of scenes, used)
    from slimkit.sam.coco import letterbox_image
    from slimkit.sam.tinysam.cache import CacheConfig, cache_embeddings, load_teacher

    write_sa1b(tmp_path / "a")
    write_sa1b(tmp_path / "b", seed=1)  # same ids, other images
    teacher = tiny_teacher(tmp_path / "teacher")
    emb = tmp_path / "emb"
    assert main(["sam", "cache-embeddings", "--teacher", str(teacher), "--images",
                 str(tmp_path / "a"), "--shard-size", "2", "--device", "cpu",
                 "--out", str(emb)]) == 0  # fmt: skip
    man = json.loads((emb / "manifest.json").read_text())
    assert man["ids"] == ["sa_1", "sa_2", "sa_10"] and man["count"] == 3
    assert [sh["count"] for sh in man["shards"]] == [2, 1]
    model = load_teacher(teacher).eval()
    from PIL import Image

    x = letterbox_image(Image.open(tmp_path / "a" / "sa_10.jpg").convert("RGB"), 256)
    with torch.no_grad():
        want = model.image_encoder(
            model.preprocess(torch.as_tensor(x).permute(2, 0, 1)[None].float())
        )
    torch.testing.assert_close(load_file(emb / "shard-00001.safetensors")["embeddings"], want)
    # --images DIR and --data sa1b:DIR name the same list: the cache serves sam distill
    cached = _task(tmp_path, f"sa1b:{tmp_path / 'a'}", embeddings=str(emb))
    plain = _task(tmp_path, f"sa1b:{tmp_path / 'a'}")
    torch.testing.assert_close(
        cached.cache_emb.get([2, 0]), torch.cat([want, cached.cache_emb.get([0])])
    )
    a, b = cached.loss((0, [2, 0], None))[0], plain.loss((0, [2, 0], None))[0]
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    for data in (f"sa1b:{tmp_path / 'b'}", "scenes"):
        with pytest.raises(SlimkitError, match="stale.*made from teacher .* on images:"):
            _task(tmp_path, data, scenes=3, embeddings=str(emb))
    cache_embeddings(CacheConfig(teacher=str(teacher), scenes=3, device="cpu"), out=tmp_path / "se")
    with pytest.raises(SlimkitError, match="stale"):
        _task(tmp_path, f"sa1b:{tmp_path / 'a'}", embeddings=str(tmp_path / "se"))
    with pytest.raises(SlimkitError, match="not both"):
        CacheConfig(teacher=str(teacher), images="x", data="sa1b:x")


# ---------------------------------------------------------------- prompts


def test_prompts_fall_inside_their_gt_mask_and_only_prompted_masks_are_decoded(
    tmp_path, one_thread
):
    # property over many draws; catches: a point outside its instance or a box that is not the
    # instance's tight box (masks and prompts in different coordinates), every mask of an image
    # decoded for a step, and hard points drawn in the padding below / right of the image
    write_sa1b(tmp_path / "sa1b", n=8)
    task = _task(tmp_path, f"sa1b:{tmp_path / 'sa1b'}", box_prob=0.5, prompts_per_image=3,
                 hard_prompts=True, max_rounds=9)  # fmt: skip
    seen = 0
    for seed in range(20):
        _, masks, extent = task.data.sample(seed % 3)
        pts, boxes = task.draw_prompts(masks, np.random.default_rng(seed))
        assert len(pts) + len(boxes) == 3 and masks.decoded == 3
        for m, (x, y) in pts:
            assert m[int(y), int(x)]
        for m, bx in boxes:
            ys, xs = np.nonzero(m)
            assert bx.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        seen += len(pts)
    assert seen > 10
    # a prediction that is foreground everywhere: the error region is everything outside the
    # instance, padding included unless the sampler stops at the image's extent
    _, masks, extent = task.data.sample(0)
    gt = np.stack([masks[k] for k in range(3)])
    k_low = task.model.prompt_encoder.mask_input_size
    task.model.decode = lambda emb, pts, b, m, mm: (torch.full((len(pts[0]), 3, *k_low), 5.0),
                                                    torch.zeros(len(pts[0]), 3))  # fmt: skip
    coords0 = np.stack([np.argwhere(m)[0][::-1] for m in gt]).astype(np.float32)[:, None]
    for seed in range(5):
        coords, labels = task.hard_points(torch.zeros(1), gt, coords0, np.random.default_rng(seed),
                                          extent)  # fmt: skip
        real = labels[:, 1:] != -1
        assert real.any() and (labels[:, 1:][real] == 0).all()  # negatives outside the mask
        assert (coords[:, 1:][real][:, 1] < extent[0]).all()


# ---------------------------------------------------------------- training


def test_sa1b_distill_from_the_cli_and_resume_is_bit_identical(tmp_path, monkeypatch, one_thread):
    # catches: sam distill not reaching the SA-1B reader from the command line, an image order
    # that is not a function of (seed, step) (resume would draw other images), and lazily read
    # state that a resumed run does not rebuild the same way
    write_sa1b(tmp_path / "sa1b")
    teacher = tiny_teacher(tmp_path / "teacher")
    data = f"sa1b:{tmp_path / 'sa1b'}"
    assert main(["sam", "cache-embeddings", "--teacher", str(teacher), "--data", data,
                 "--device", "cpu", "--out", str(tmp_path / "emb")]) == 0  # fmt: skip
    args = ["--teacher", str(teacher), "--student", "vit_micro", "--data", data, "--embeddings",
            str(tmp_path / "emb"), "--steps", "4", "--batch-size", "2", "--prompts-per-image",
            "2", "--checkpoint-every", "2", "--val-scenes", "1", "--warmup-steps", "1",
            "--hard-prompts", "--max-rounds", "2", "--hard-mask-weighting", "--device", "cpu"]  # fmt: skip
    assert main(["sam", "distill", *args, "--out", str(tmp_path / "full")]) == 0
    task = _task(tmp_path, data)
    # every epoch a permutation of the 3 images, each a function of (seed, step)
    order = [i for s in range(3) for i in task.data.order(0, s, 2)]
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:6]) == [0, 1, 2]
    assert order == [i for s in range(3) for i in task.data.order(0, s, 2)]
    cfg = _cfg(tmp_path, data, student="vit_micro", embeddings=str(tmp_path / "emb"), steps=4,
               checkpoint_every=2, warmup_steps=1, hard_prompts=True, max_rounds=2,
               hard_mask_weighting=True)  # fmt: skip
    crash_on_call(monkeypatch, Trainer, "_one_step", 4)
    with pytest.raises(Crash):
        distill_sam(cfg, out=tmp_path / "cut")
    monkeypatch.undo()
    rep = distill_sam(cfg, out=tmp_path / "cut", resume=True)
    assert 0 < rep["resumed_at_step"] < 4
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    assert la == [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert len(la) == 4 and all(np.isfinite(la))


def test_distill_reads_coco_instances_lazily_without_crowds(tmp_path, one_thread):
    # catches: --data coco: refused by sam distill, crowd regions used as instances, and images
    # without a usable instance kept in the list
    from PIL import Image

    d = tmp_path / "coco"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    from slimkit.sam.coco import letterbox_mask

    images, anns, kept = [], [], []
    for k in range(3):
        Image.fromarray(np.full((H, W, 3), 60 * k, np.uint8)).save(d / "images" / f"{k:03d}.jpg")
        images.append({"id": k, "file_name": f"{k:03d}.jpg", "height": H, "width": W})
        for j, m in enumerate(_masks(rng, 2 if k < 2 else 0)):  # image 2: no instance
            anns.append({"id": 10 * k + j, "image_id": k, "area": int(m.sum()), "iscrowd": j,
                         "segmentation": rle_encode(m)})  # fmt: skip
            kept += [m] if j == 0 else []
    (d / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns}))
    task = _task(tmp_path, f"coco:{d}", steps=2)
    assert task.data.ids == ["000", "001"] and [task.data.count(i) for i in range(2)] == [1, 1]
    _, masks, extent = task.data.sample(1)
    assert extent == (192, 256) and np.array_equal(masks[0], letterbox_mask(kept[1], 256))
    loss, parts = task.loss((0, [0, 1], None))
    assert torch.isfinite(loss) and parts["mask"] > 0


# ---------------------------------------------------------------- bad folders


def test_malformed_sa1b_folders_are_one_clear_line(tmp_path, capsys):
    # catches: a traceback (or a silent skip) for an image without its JSON, a JSON without
    # annotations (found when the first image is listed, or when a later image is first read),
    # an empty folder, and --images together with --data
    teacher = str(tiny_teacher(tmp_path / "teacher"))
    common = ["--teacher", teacher, "--steps", "2", "--batch-size", "2", "--val-scenes", "1",
              "--device", "cpu"]  # fmt: skip

    def distill(d: Path, msg: str) -> None:
        refused(capsys, ["sam", "distill", *common, "--data", f"sa1b:{d}", "--out",
                         str(tmp_path / f"run-{d.name}")], msg)  # fmt: skip

    write_sa1b(tmp_path / "lonely")
    (tmp_path / "lonely" / "sa_2.json").unlink()
    distill(tmp_path / "lonely", "no SA-1B annotation file beside sa_2.jpg")
    write_sa1b(tmp_path / "nokey")
    (tmp_path / "nokey" / "sa_1.json").write_text(json.dumps({"image": {}}))
    distill(tmp_path / "nokey", "sa_1.json is not an SA-1B annotation file")
    write_sa1b(tmp_path / "empty", stems=("sa_1", "sa_2"))
    j = tmp_path / "empty" / "sa_2.json"
    j.write_text(json.dumps({**json.loads(j.read_text()), "annotations": []}))
    distill(tmp_path / "empty", "sa_2.json lists no annotations")
    (tmp_path / "none").mkdir()
    refused(capsys, ["sam", "cache-embeddings", "--teacher", teacher, "--images",
                     str(tmp_path / "none"), "--out", str(tmp_path / "e")], "holds no images")  # fmt: skip
    refused(capsys, ["sam", "cache-embeddings", "--teacher", teacher, "--images", "x", "--data",
                     "sa1b:x", "--out", str(tmp_path / "e")], "not both")  # fmt: skip
    refused(
        capsys,
        ["sam", "distill", *common, "--data", "sa1b", "--out", str(tmp_path / "r")],
        "--data must be scenes, sa1b:DIR or coco:DIR",
    )


def test_nuclei_image_is_the_stardist_pair():
    """The offline real image: 125 disjoint nuclei read from the wheel's label image, whose
    pixels they cover exactly; the grey image fills 0..255 after percentile scaling."""
    import importlib.util

    import tifffile

    from slimkit.sam.tinysam.data import nuclei_image

    img, masks = nuclei_image()
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 2]).all() and img.min() == 0 and img.max() == 255
    assert len(masks) == 125
    cover = np.sum(masks, axis=0)
    assert cover.max() == 1  # disjoint
    d = Path(importlib.util.find_spec("stardist").submodule_search_locations[0])
    label = tifffile.imread(d / "data" / "images" / "mask2d.tif")
    assert ((cover == 1) == (label > 0)).all()
