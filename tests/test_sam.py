"""SAM: numerical equality with the reference implementation, checkpoint layout, predictor errors."""

from __future__ import annotations

import os
from functools import partial

import numpy as np
import pytest
import torch

from slimkit.core.errors import SlimkitError
from slimkit.sam.checkpoint import load_sam
from slimkit.sam.model import build_sam
from slimkit.sam.predictor import SamPredictor

sa = pytest.importorskip("segment_anything")


def reference_like(model):
    """The reference package's Sam with the same shape and the same (random) weights."""
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    c = model.cfg
    g = c.img_size // c.patch
    ref = Sam(
        image_encoder=ImageEncoderViT(depth=c.depth, embed_dim=c.dim, img_size=c.img_size, mlp_ratio=4,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c.heads,
                                      patch_size=c.patch, qkv_bias=True, use_rel_pos=True,
                                      global_attn_indexes=c.global_blocks, window_size=c.window, out_chans=c.prompt_dim),
        prompt_encoder=PromptEncoder(embed_dim=c.prompt_dim, image_embedding_size=(g, g),
                                     input_image_size=(c.img_size, c.img_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=c.prompt_dim, iou_head_depth=3,
                                 iou_head_hidden_dim=256,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=c.prompt_dim,
                                                               mlp_dim=c.decoder_mlp, num_heads=c.decoder_heads)),
        pixel_mean=list(c.pixel_mean), pixel_std=list(c.pixel_std),
    ).eval()  # fmt: skip
    return ref


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    mine = build_sam("vit_mini")
    ref = reference_like(mine)
    g = torch.Generator().manual_seed(1)
    sd = ref.state_dict()
    with torch.no_grad():  # non-trivial values everywhere (pos_embed and rel_pos start at zero)
        for v in sd.values():
            if v.is_floating_point():
                v.add_(0.05 * torch.randn(v.shape, generator=g))
    mine.load_state_dict(sd, strict=True)
    return mine, ref


def test_same_masks_and_iou_as_the_reference_predictor(pair):
    mine, ref = pair
    img = (np.random.default_rng(0).random((180, 240, 3)) * 255).astype(np.uint8)
    a, b = SamPredictor(mine), sa.SamPredictor(ref)
    a.set_image(img)
    b.set_image(img)
    assert torch.allclose(a.features, b.features, atol=1e-5)
    prompts = [
        dict(point_coords=np.array([[50, 60]]), point_labels=np.array([1])),
        dict(
            point_coords=np.array([[50, 60], [200, 150]]),
            point_labels=np.array([1, 0]),
            multimask_output=False,
        ),
        dict(box=np.array([20, 30, 180, 170])),
        dict(
            point_coords=np.array([[100, 100]]),
            point_labels=np.array([1]),
            box=np.array([20, 30, 180, 170]),
        ),
    ]
    for kw in prompts:
        m1, i1, l1 = a.predict(**kw)
        m2, i2, l2 = b.predict(**kw)
        assert (
            m1.shape == m2.shape
            and np.allclose(i1, i2, atol=1e-5)
            and np.allclose(l1, l2, atol=1e-4)
        )
        assert (m1 != m2).mean() < 1e-4  # thresholding at 0 may flip a pixel at round-off
    # the previous low-res logits as a mask prompt
    _, _, low = a.predict(
        point_coords=np.array([[50, 60]]), point_labels=np.array([1]), multimask_output=False
    )
    kw = dict(point_coords=np.array([[50, 60]]), point_labels=np.array([1]), mask_input=low)
    assert np.allclose(a.predict(**kw)[1], b.predict(**kw)[1], atol=1e-5)


def test_vit_b_has_the_official_layout_and_round_trips(tmp_path):
    ref = sa.sam_model_registry["vit_b"]()
    mine = build_sam("vit_b")
    a, b = mine.state_dict(), ref.state_dict()
    assert len(a) == len(b) == 314 and all(tuple(a[k].shape) == tuple(b[k].shape) for k in b)
    assert a["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    assert a["image_encoder.blocks.2.attn.rel_pos_h"].shape == (127, 64)
    assert (
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in a and "pixel_mean" not in a
    )
    torch.save(b, tmp_path / "sam_vit_b.pth")
    loaded = load_sam(tmp_path / "sam_vit_b.pth")  # architecture guessed from the encoder width
    assert all(torch.equal(loaded.state_dict()[k], b[k]) for k in b)


def test_bad_inputs_get_clear_errors(tmp_path, pair):
    mine, _ = pair
    torch.save(mine.state_dict(), tmp_path / "mini.pth")
    with pytest.raises(SlimkitError, match=r"shape .* expects"):
        load_sam(tmp_path / "mini.pth", arch="vit_b")
    with pytest.raises(SlimkitError, match="unknown SAM architecture"):
        load_sam(tmp_path / "mini.pth", arch="vit_q")
    with pytest.raises(SlimkitError, match="does not exist"):
        load_sam(tmp_path / "none.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")
    with pytest.raises(SlimkitError, match="weights_only"):
        load_sam(tmp_path / "pickled.pth")
    p = SamPredictor(mine)
    with pytest.raises(SlimkitError, match="set_image first"):
        p.predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(SlimkitError, match="empty"):
        p.set_image(np.zeros((0, 10, 3), np.uint8))
    p.set_image(np.zeros((40, 60, 3), np.uint8))
    with pytest.raises(SlimkitError, match="outside"):
        p.predict(point_coords=np.array([[70, 10]]), point_labels=np.array([1]))
    with pytest.raises(SlimkitError, match="at least one prompt"):
        p.predict()


def oracle(gt: np.ndarray):
    """+10 inside the instance under the point, -10 outside; IoU 1 (spec T3a)."""

    def predict(points):
        out = []
        for x, y in points:
            inst = gt == gt[int(y), int(x)]
            out.append(np.where(inst, 10.0, -10.0))
        lg = torch.tensor(np.stack(out), dtype=torch.float32)[:, None].repeat(1, 3, 1, 1)
        return lg, torch.ones(len(points), 3)

    return predict


def scene(h=128, w=160):
    gt = np.zeros((h, w), dtype=int)
    gt[10:50, 10:70] = 1
    gt[60:120, 20:60] = 2
    gt[30:100, 90:150] = 3
    gt[2:14, 138:152] = 4  # small: no sparse point hits it, dense points do
    return gt


def test_hierarchical_lattice_size_and_skipped_points():
    from slimkit.sam.everything import dense_candidates, grid_points, outside_region

    sparse = grid_points(8, 1024, 1024)
    cand = dense_candidates(sparse, 1024, 1024, 32)
    assert len(sparse) == 64 and len(cand) == 897 and len({tuple(p) for p in cand}) == 897
    # on a synthetic confident field, exactly the candidates inside it are skipped
    region = np.zeros((1024, 1024), dtype=bool)
    region[:512, :300] = True
    kept = outside_region(cand, region)
    want = [p for p in cand if not (p[1] < 512 and p[0] < 300)]
    assert len(kept) == len(want) and np.allclose(np.sort(kept, 0), np.sort(np.array(want), 0))


def test_everything_dense_and_hierarchical_on_an_oracle():
    from slimkit.sam.everything import (
        EverythingConfig,
        dense_candidates,
        grid_points,
        outside_region,
        segment_everything,
    )

    gt = scene()
    h, w = gt.shape
    dense = segment_everything(
        oracle(gt), (h, w), EverythingConfig(mode="dense", points_per_side=16)
    )
    hier = segment_everything(
        oracle(gt), (h, w), EverythingConfig(mode="hierarchical", points_per_side=16)
    )
    found = lambda r: sorted({int(np.bincount(gt[m["segmentation"]]).argmax()) for m in r["masks"]})  # noqa: E731
    assert found(dense) == found(hier)
    assert dense["prompts"] == 256
    sparse = grid_points(4, w, h)
    confident = np.zeros_like(gt, dtype=bool)
    for x, y in sparse:
        confident |= gt == gt[int(y), int(x)]
    expected = len(outside_region(dense_candidates(sparse, w, h, 16), confident))
    assert hier["prompts_per_pass"] == [16, expected] and hier["prompts"] < dense["prompts"]
    assert hier["confident_fraction"] == pytest.approx(confident.mean())
    assert dense["confident_fraction"] is None
    for r in (dense, hier):  # NMS left one mask per instance, exact
        assert len(r["masks"]) == len(found(r))
        for m in r["masks"]:
            inst = int(np.bincount(gt[m["segmentation"]]).argmax())
            assert np.array_equal(m["segmentation"], gt == inst)


def test_rle_round_trip():
    from slimkit.sam.everything import rle_decode, rle_encode

    rng = np.random.default_rng(0)
    for m in (rng.random((7, 5)) > 0.5, np.ones((3, 4), bool), np.zeros((2, 2), bool)):
        r = rle_encode(m)
        assert sum(r["counts"]) == m.size and np.array_equal(rle_decode(r), m)
    assert rle_encode(np.array([[0, 1], [1, 1]], bool))["counts"] == [1, 3]  # column-major: 0,1,1,1


def test_cli_everything_and_predict_write_their_outputs(tmp_path):
    import json

    from PIL import Image

    from slimkit.cli import main

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "ev"
    args = ["sam", "everything", str(img), "--random-weights", "--points-per-side", "8", "--pred-iou-thresh", "-100",
            "--stability-score-thresh", "0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    rep = json.loads((out / "masks.json").read_text())
    assert (
        rep["prompts"] == rep["prompts_per_pass"][0] + rep["prompts_per_pass"][1]
        and rep["prompts_per_pass"][0] == 4
    )
    assert (out / "overlay.png").is_file() and len(list(out.glob("mask_*.png"))) == rep["masks"]
    assert (
        main(
            [
                "sam",
                "predict",
                str(img),
                "--random-weights",
                "--box",
                "5,5,40,30",
                "--out",
                str(tmp_path / "m.png"),
            ]
        )
        == 0
    )
    assert (
        main(["sam", "predict", str(img), "--out", str(tmp_path / "m.png"), "--point", "1,1"]) == 2
    )  # no weights
    assert (
        main(
            [
                "sam",
                "predict",
                str(tmp_path / "none.png"),
                "--random-weights",
                "--point",
                "1,1",
                "--out",
                "x.png",
            ]
        )
        == 2
    )


def test_scenes_and_a_short_training_run_resume_exactly(tmp_path, monkeypatch):
    from conftest import Crash
    from safetensors.torch import load_file

    import slimkit.sam.train as st
    from slimkit.cli import main

    img, masks = st.draw_scene(64, 3)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8 and len(masks) >= 1
    total = np.sum([m.astype(int) for m in masks], 0)
    assert total.max() <= 1  # visible parts never overlap
    args = ["sam", "train", "--steps", "4", "--batch-size", "2", "--prompts-per-image", "2", "--scenes", "8",
            "--checkpoint-every", "2", "--val-scenes", "2", "--warmup-steps", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    calls = {"n": 0}
    original = st._step_loss

    def crash_at_step_three(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash
        return original(*a, **k)

    monkeypatch.setattr(st, "_step_loss", crash_at_step_three)
    with pytest.raises(Crash):
        main([*args, "--out", str(tmp_path / "cut")])
    monkeypatch.undo()
    assert main([*args, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "cut" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = st.load_trained(tmp_path / "full")  # and it serves `slimkit sam everything`
    assert model.cfg.img_size == 256


def test_vit_t_has_the_mobilesam_tinysam_layout(tmp_path):
    """Key count, sizes and the checkpoint round trip of the TinyViT-5M model (the spec's
    measurements of the official modules: 439 keys, 10.13 M / 6.07 M / 4.06 M parameters)."""
    m = build_sam("vit_t")
    sd = m.state_dict()
    assert len(sd) == 439 and len(build_sam("tinyvit-5m").state_dict()) == 439
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    assert round(count(m) / 1e6, 2) == 10.13 and round(count(m.image_encoder) / 1e6, 2) == 6.07
    assert round(count(m.mask_decoder) / 1e6, 2) == 4.06 and count(m.prompt_encoder) == 6220
    assert sd["image_encoder.layers.2.blocks.0.attn.attention_biases"].shape == (
        5,
        196,
    )  # 14 x 14 window
    assert (
        "image_encoder.layers.1.blocks.0.attn.attention_bias_idxs" not in sd
    )  # rebuilt, not stored
    assert {"image_encoder.head.weight", "image_encoder.norm_head.weight"} <= set(sd)
    torch.save({"model": sd}, tmp_path / "tinysam.pth")
    loaded = load_sam(tmp_path / "tinysam.pth")
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    with torch.no_grad():
        e = loaded.image_encoder(torch.zeros(1, 3, 1024, 1024))
    assert e.shape == (1, 256, 64, 64)


def test_vit_t_matches_the_mobilesam_reference():
    """The TinyViT-5M SAM against an independent MobileSAM implementation (ultralytics'
    ``build_mobile_sam``, which loads the official mobile_sam.pt): the same random weights load
    key for key, and image embeddings, masks and IoU predictions agree."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics.models.sam.build import build_mobile_sam

    torch.manual_seed(0)
    ref = build_mobile_sam()
    sd = ref.state_dict()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial values everywhere (attention biases start at zero)
        for k, v in sd.items():
            if v.is_floating_point() and "running_var" not in k:
                v.add_(0.05 * torch.randn(v.shape, generator=g))
    ref.train()
    ref.eval()  # the reference caches its attention biases when switched to eval()
    mine = build_sam("vit_t").eval()
    assert set(sd) == set(mine.state_dict())
    mine.load_state_dict(sd, strict=True)
    x = torch.randn(1, 3, 1024, 1024, generator=g)
    pts = (torch.tensor([[[200.0, 300.0], [700.0, 650.0]]]), torch.tensor([[1, 0]]))
    box = torch.tensor([[100.0, 150.0, 800.0, 900.0]])
    with torch.no_grad():
        e_ref, e_mine = ref.image_encoder(x), mine.image_encoder(x)
        assert (e_ref - e_mine).abs().max() < 1e-4 * e_ref.abs().max()
        sparse, dense = ref.prompt_encoder(points=pts, boxes=box, masks=None)
        low_ref, iou_ref = ref.mask_decoder(
            e_ref, ref.prompt_encoder.get_dense_pe(), sparse, dense, True
        )
        low, iou = mine.decode(e_mine, pts, box, None, True)
    assert torch.allclose(iou, iou_ref, atol=1e-4)
    assert (low - low_ref).abs().max() < 1e-3 * low_ref.abs().max()
    assert ((low > 0) == (low_ref > 0)).float().mean() > 0.999


def test_coco_folder_polygons_and_rle_decode_and_train(tmp_path):
    import json

    from PIL import Image

    mu = pytest.importorskip("pycocotools.mask")
    from slimkit.cli import main
    from slimkit.sam.coco import decode_segmentation, load_coco_folder

    m = np.zeros((40, 60), np.uint8)
    m[5:20, 10:40] = 1
    m[25:35, 3:9] = 1
    rle = mu.encode(np.asfortranarray(m))
    assert np.array_equal(
        decode_segmentation({"size": rle["size"], "counts": rle["counts"].decode()}, 40, 60), m > 0
    )
    poly = [[10, 5, 40, 5, 40, 20, 10, 20]]
    assert (
        decode_segmentation(poly, 40, 60)[12, 20] and not decode_segmentation(poly, 40, 60)[30, 50]
    )
    images, anns = [], []
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 60, 3)) * 255).astype(np.uint8)).save(
            tmp_path / f"{i}.png"
        )
        images.append({"id": i, "file_name": f"{i}.png", "height": 40, "width": 60})
        anns.append(
            {
                "id": 2 * i,
                "image_id": i,
                "segmentation": {"size": [40, 60], "counts": rle["counts"].decode()},
            }
        )
        anns.append({"id": 2 * i + 1, "image_id": i, "segmentation": poly})
    (tmp_path / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns}))
    items = load_coco_folder(tmp_path, 256)
    assert len(items) == 3 and len(items[0][1]) == 2 and items[0][0].shape == (256, 256, 3)
    assert main(["sam", "train", "--data", f"coco:{tmp_path}", "--steps", "2", "--batch-size", "1",
                 "--warmup-steps", "1", "--out", str(tmp_path / "run")]) == 0  # fmt: skip
