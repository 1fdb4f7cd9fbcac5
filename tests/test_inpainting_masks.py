"""Masks of the inpainting attack (evaluation/inpainting.py) and the masked-token pooling
(metrics/masked_tokens.py): random boxes, the user's mask folder, patch selection."""

import numpy as np
import pytest
import torch
from PIL import Image

from ambient_jax import errors
from ambient_jax.evaluation import inpainting as attack
from ambient_jax.metrics import masked_tokens


@pytest.mark.parametrize("size", [(32, 32), (1024, 768), (64, 200)])
def test_random_boxes_cover_1_to_50_percent_and_depend_on_seed_and_index_only(size):
  indices = np.arange(300)
  masks = attack.random_box_masks(indices, size, seed=3)
  area = masks.mean(axis=(1, 2))
  assert masks.shape == (300, *size) and np.all((masks == 0) | (masks == 1))  # no sort of 236 M values
  assert area.min() >= 0.01 and area.max() <= 0.5
  assert area.max() > 0.4 and area.min() < 0.05            # the whole range is used
  for m in masks[:20]:                                      # one box: rows x cols of ones
    rows, cols = m.any(1), m.any(0)
    assert m.sum() == rows.sum() * cols.sum()
  np.testing.assert_array_equal(attack.random_box_masks(indices[::-1][:5], size, seed=3),
                                masks[::-1][:5])            # a pure function of (seed, index)
  assert not np.array_equal(attack.random_box_masks([0], size, seed=4)[0], masks[0])


def test_mask_folder_reads_white_as_inpaint_and_names_each_bad_file(tmp_path):
  masks = tmp_path / "masks"
  (masks / "sub").mkdir(parents=True)
  pixels = np.zeros((8, 6), np.uint8)
  pixels[2:5, 1:3] = 255
  pixels[0, 0] = 100                                        # grey below half: not masked
  Image.fromarray(pixels).save(masks / "a.png")
  Image.fromarray(np.stack([pixels] * 3, -1)).save(masks / "sub" / "b.png")  # RGB, x.jpg's mask
  got = attack.read_masks(str(masks), ["a.png", "sub/b.jpg"], (8, 6))
  np.testing.assert_array_equal(got, np.stack([pixels >= 128] * 2).astype(np.float32))
  with pytest.raises(attack.MaskError, match=r"no mask for image c\.png"):
    attack.read_masks(str(masks), ["c.png"], (8, 6))
  with pytest.raises(attack.MaskError, match=r"a\.png is 6x8 \(WxH\); its image is attacked at 8x8"):
    attack.read_masks(str(masks), ["a.png"], (8, 8))
  (masks / "d.png").write_bytes(b"not an image")
  with pytest.raises(attack.MaskError, match=r"d\.png cannot be read"):
    attack.read_masks(str(masks), ["d.png"], (8, 6))
  with pytest.raises(errors.UserError, match="no such folder"):
    attack.read_masks(str(tmp_path / "none"), ["a.png"], (8, 6))
  assert "\n" not in str(pytest.raises(attack.MaskError, attack.read_masks, str(masks), ["a.png"],
                                       (8, 8)).value)


@pytest.mark.parametrize("side", [32, 37, 224, 300, 1024])
def test_mask_resize_is_torch_nearest(side):
  masks = (np.random.default_rng(side).random((2, side, side)) > 0.7).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(masks)[:, None], size=(224, 224),
                                             mode="nearest")[:, 0].numpy()
  np.testing.assert_array_equal(masked_tokens.resize_mask(masks, 224), expected)


def test_patch_selection_and_pooling_equal_the_official_loops():
  """`get_patch_mask` of filter_results_masking.py (any masked pixel in the patch), then the
  pre-norm tokens summed over those patches (CLS left out) and normalised."""
  rng = np.random.default_rng(0)
  masks = np.zeros((3, 224, 224), np.float32)
  masks[0, 20:31, 100:160] = 1        # partial patches count: any overlap
  masks[1, 13, 13] = 1                # a single pixel: one patch
  masks[2] = 1
  patches = masked_tokens.patch_mask(masks)
  for m, p in zip(masks, patches):
    loop = [np.any(m[i * 14:(i + 1) * 14, j * 14:(j + 1) * 14]) for i in range(16) for j in range(16)]
    np.testing.assert_array_equal(p, loop)
  assert patches[1].sum() == 1 and patches[2].all()
  tokens = rng.standard_normal((3, 257, 8)).astype(np.float32)
  direct = np.stack([(t[1:] * p[:, None]).sum(0) for t, p in zip(tokens, patches)])
  direct /= np.linalg.norm(direct, axis=1, keepdims=True)
  np.testing.assert_allclose(masked_tokens.pooled(tokens, patches), direct, atol=1e-6)
  other = rng.standard_normal((3, 257, 8)).astype(np.float32)
  other_direct = np.stack([(t[1:] * p[:, None]).sum(0) for t, p in zip(other, patches)])
  other_direct /= np.linalg.norm(other_direct, axis=1, keepdims=True)
  np.testing.assert_allclose(masked_tokens.pooled_similarity(tokens, other, patches),
                             np.sum(direct * other_direct, 1), atol=1e-6)
  np.testing.assert_allclose(masked_tokens.mask_ratio(masks), [11 * 60 / 224**2, 1 / 224**2, 1])


def test_nearest_search_equals_dense_numpy_over_blocks():
  rng = np.random.default_rng(1)
  queries = rng.standard_normal((4, 17, 6)).astype(np.float32)
  dataset = rng.standard_normal((11, 17, 6)).astype(np.float32)
  dataset[7] = queries[2] * 3         # same direction under any mask: similarity 1
  patches = rng.random((4, 16)) > 0.5
  sim, idx = masked_tokens.nearest_pooled_similarity(queries, dataset, patches, block_size=4)
  q = np.asarray(masked_tokens.pooled(queries, patches))
  dense = np.stack([np.asarray(masked_tokens.pooled(dataset, np.repeat(p[None], 11, 0))) @ qi
                    for qi, p in zip(q, patches)])
  np.testing.assert_allclose(sim, dense.max(1), atol=1e-6)
  np.testing.assert_array_equal(idx, dense.argmax(1))
  assert idx[2] == 7 and sim[2] == pytest.approx(1.0, abs=1e-6)


def test_summary_counts_only_kept_images():
  result = attack.InpaintingAttackResult(
      indices=np.array([0, 1, 2, 3]), masks=np.zeros((4, 2, 2)), inpainted=None,
      mask_ratio=np.array([0.2, 0.05, 0.3, 0.4]), kept=np.array([True, False, True, True]),
      source_similarity=np.array([0.97, 0.999, 0.5, 0.92]),
      nearest_similarity=np.array([0.995, 0.999, 0.6, 0.93]), nearest_index=np.array([0, 1, 5, 3]))
  s = result.summary
  assert (s["count"], s["kept"]) == (4, 3)
  assert s["source"]["frac_sim_above_0.9"] == pytest.approx(2 / 3)
  assert s["source"]["frac_sim_above_0.99"] == 0.0
  assert s["nearest"]["frac_sim_above_0.99"] == pytest.approx(1 / 3)
  assert s["nearest"]["self_match"] == pytest.approx(2 / 3)
  both = attack.concatenate([result, result])
  assert both.summary["kept"] == 6 and both.inpainted is None
