"""Input masks, attention patterns, and the equality of every attention path to the explicit matrix."""
import pytest
import torch

from masks import Pattern, attend, block_size, draw_mask, kept_count, parse_masks, sample_keep, slot_counts


def test_patterns_for_three_slots_of_one_token():
    causal = Pattern('causal', (1, 1, 1), (1, 1, 1)).matrix()
    autoregressive = Pattern('autoregressive', (0, 1, 1), (1, 1, 1)).matrix()
    isolated = Pattern('isolated', (1, 1, 1), (1, 1, 1)).matrix()
    assert causal.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert autoregressive.tolist() == [[True, False, False], [True, True, False]]
    assert isolated.tolist() == torch.eye(3, dtype=torch.bool).tolist()


def test_pattern_rejects_queries_with_nothing_to_see():
    with pytest.raises(ValueError, match="no key"):
        Pattern('autoregressive', (2, 2), (2, 2))  # slot 0 targets would see no context


CASES = [
    Pattern('causal', (3, 3, 3, 3), (3, 3, 3, 3)),
    Pattern('causal', (2, 5, 1), (2, 5, 1)),
    Pattern('autoregressive', (0, 4, 4, 4), (2, 2, 2, 2)),
    Pattern('isolated', (4, 4, 4), (4, 4, 4)),   # folded into the batch
    Pattern('isolated', (2, 3), (2, 3)),         # unequal slots: one call per slot
]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=CUDA)])
@pytest.mark.parametrize('impl', ['slots', 'flex'])
@pytest.mark.parametrize('reference', CASES, ids=lambda p: f"{p.rule}{p.q_counts}")
def test_fast_paths_equal_explicit_matrix(reference, impl, device):
    torch.manual_seed(0)
    Lq, Lk = sum(reference.q_counts), sum(reference.k_counts)
    grad = impl != 'flex' or device == 'cuda'  # FlexAttention has no backward on CPU
    tol = 1e-5 if device == 'cpu' else 2e-4  # CUDA's fused kernels sum in another order
    q, k, v = (torch.randn(2, 3, L, 16, device=device, requires_grad=grad) for L in (Lq, Lk, Lk))
    fast = Pattern(reference.rule, reference.q_counts, reference.k_counts, impl)
    dense = Pattern(reference.rule, reference.q_counts, reference.k_counts, 'dense')
    out_fast, out_dense = attend(q, k, v, fast), attend(q, k, v, dense)
    assert torch.allclose(out_fast, out_dense, atol=tol)
    if not grad:
        return
    grads_fast = torch.autograd.grad(out_fast.square().sum(), (q, k, v))
    grads_dense = torch.autograd.grad(out_dense.square().sum(), (q, k, v))
    for a, b in zip(grads_fast, grads_dense):
        assert torch.allclose(a, b, atol=tol)


def test_parse_masks_reads_generators_and_rejects_typos():
    assert parse_masks('8x0.15,2x0.7') == [(8, 0.15), (2, 0.7)]
    for bad in ['8x0.15;2x0.7', '8*0.15', 'x0.7', '8x']:
        with pytest.raises(SystemExit, match='blocks x scale'):
            parse_masks(bad)


def test_block_size_covers_the_scale():
    g = torch.Generator().manual_seed(0)
    for scale in (0.15, 0.7):
        h, w = block_size((16, 16), scale, (0.75, 1.5), g)
        assert abs(h * w / 256 - scale) < 0.08
        assert 0.75 / 1.3 <= h / w <= 1.5 * 1.3


def test_draw_mask_is_union_of_the_blocks():
    g = torch.Generator().manual_seed(0)
    one = draw_mask((16, 16), 1, (4, 6), g)
    assert one.sum() == 24
    rows, cols = one.nonzero().unbind(1)
    assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 5
    many = draw_mask((16, 16), 8, (4, 6), g)
    assert 24 <= many.sum() <= 8 * 24


@pytest.mark.parametrize('num_blocks, scale, low, high', [(8, 0.15, 0.55, 0.70), (2, 0.7, 0.75, 0.90)])
def test_masked_fraction_before_equalising(num_blocks, scale, low, high):
    g = torch.Generator().manual_seed(0)
    fractions = []
    for _ in range(50):  # 50 batches: a block size each, 8 samples each
        block_hw = block_size((16, 16), scale, (0.75, 1.5), g)
        fractions += [draw_mask((16, 16), num_blocks, block_hw, g).float().mean().item() for _ in range(8)]
    mean = sum(fractions) / len(fractions)
    assert low <= mean <= high, mean


def test_keep_is_temporally_consistent_equal_and_nonempty():
    g = torch.Generator().manual_seed(1)
    T, H, W = 4, 16, 16
    for num_blocks, scale in [(8, 0.15), (2, 0.7)]:
        keep = sample_keep(6, (T, H, W), num_blocks, scale, generator=g)
        assert keep.shape[0] == 6 and keep.shape[1] % T == 0 and keep.shape[1] > 0
        k = keep.shape[1] // T
        per_slot = keep.reshape(6, T, k)
        slot = per_slot // (H * W)
        assert (slot == torch.arange(T)[None, :, None]).all()  # slot-major, k per slot
        spatial = per_slot % (H * W)
        assert (spatial == spatial[:, :1]).all()  # the same positions in every slot
        assert (keep.diff(dim=1) > 0).all()  # sorted, no repeats
        assert slot_counts(keep, (T, H, W)) == (k,) * T
        assert k == kept_count((H, W), num_blocks, scale)  # the generator's fixed count, whatever the draw


def test_kept_count_is_fixed_per_generator_and_close_to_the_batch_minimum():
    """The fixed count replaces V-JEPA's batch minimum (one block size per batch, the smallest
    kept count of its samples): at micro-batch 16 on the paper's 16 x 16 grid the two keep about
    the same number of positions, so the masking ratio the method trains with stays the same."""
    g = torch.Generator().manual_seed(0)
    for num_blocks, scale in [(8, 0.15), (2, 0.7)]:
        k = kept_count((16, 16), num_blocks, scale)
        shapes = {sample_keep(4, (2, 16, 16), num_blocks, scale, generator=g).shape for _ in range(10)}
        assert shapes == {(4, 2 * k)}  # the same length batch after batch
        minima = []
        for _ in range(100):
            block_hw = block_size((16, 16), scale, (0.75, 1.5), g)
            minima.append(min(int((~draw_mask((16, 16), num_blocks, block_hw, g)).sum()) for _ in range(16)))
        batch_minimum = sum(minima) / len(minima)
        assert abs(k - batch_minimum) <= 0.2 * batch_minimum, (k, batch_minimum)


def test_keep_is_reproducible_under_a_seed():
    a = sample_keep(4, (4, 16, 16), 8, 0.15, generator=torch.Generator().manual_seed(3))
    b = sample_keep(4, (4, 16, 16), 8, 0.15, generator=torch.Generator().manual_seed(3))
    c = sample_keep(4, (4, 16, 16), 8, 0.15, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_impossible_mask_fails_clearly():
    with pytest.raises(ValueError, match="whole"):
        sample_keep(2, (2, 4, 4), 1, 1.0, aspect=(1.0, 1.0))
