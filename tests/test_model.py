"""Encoder, predictor and decoder: sizes, causality by perturbation, RoPE, gradients."""
import pytest
import torch
import torch.nn.functional as F

from decoder import Decoder, euler, patchify, unpatchify
from encoder import SIZES, Encoder, positions, rope
from masks import sample_keep
from predictor import Predictor

GRID = (4, 4, 4)  # T, h, w of a (B, 3, 8, 32, 32) clip with patch 8
S = 16


def tiny_encoder():
    torch.manual_seed(0)
    return Encoder(dim=48, depth=2, heads=2, patch=8).eval()


def clip(seed=0):
    return torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


def slot(tokens, t, per_slot=S):
    return tokens[:, t * per_slot:(t + 1) * per_slot]


@pytest.mark.parametrize('name, expected, tolerance', [
    ('l', 303.9e6, 0.01), ('h', 631e6, 0.01), ('g', 1.011e9, 0.01)])
def test_encoder_parameter_counts(name, expected, tolerance):
    with torch.device('meta'):
        count = Encoder(**SIZES[name]).num_params()
    assert abs(count - expected) / expected < tolerance, count


def test_predictor_and_decoder_parameter_counts():
    with torch.device('meta'):
        predictor, decoder = Predictor(1024).num_params(), Decoder(1024, 64).num_params()
    assert abs(predictor - 22.1e6) / 22.1e6 < 0.03, predictor
    assert abs(decoder - 32.9e6) / 32.9e6 < 0.03, decoder


@pytest.mark.parametrize('masked', [False, True])
def test_encoder_is_frame_causal(masked):
    encoder = tiny_encoder()
    video = clip()
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0)) if masked else None
    per_slot = keep.shape[1] // GRID[0] if masked else S
    base = encoder(video, keep)
    for t in range(GRID[0] - 1):
        future = video.clone()
        future[:, :, 2 * (t + 1):] = torch.randn_like(future[:, :, 2 * (t + 1):])  # slots > t
        out = encoder(future, keep)
        assert torch.allclose(out[:, :(t + 1) * per_slot], base[:, :(t + 1) * per_slot], atol=1e-5)
        assert not torch.allclose(slot(out, t + 1, per_slot), slot(base, t + 1, per_slot), atol=1e-3)
        past = video.clone()
        past[:, :, 2 * t:2 * t + 2] += 1.0  # slot t itself changes c_t and later
        assert not torch.allclose(slot(encoder(past, keep), GRID[0] - 1, per_slot), slot(base, GRID[0] - 1, per_slot), atol=1e-3)


def test_encoder_fast_attention_equals_explicit_mask():
    encoder = tiny_encoder()
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    fast = encoder(clip(), keep)
    encoder.attn_impl = 'dense'
    assert torch.allclose(fast, encoder(clip(), keep), atol=1e-5)


def test_encoder_returns_last_blocks_on_channels():
    encoder = tiny_encoder()
    out = encoder(clip(), last=2)
    assert out.shape == (2, 64, 96)
    assert torch.allclose(out[..., 48:], encoder(clip()), atol=1e-6)


@pytest.mark.parametrize('previous_slot', [False, True])
def test_predictor_is_autoregressive(previous_slot):
    torch.manual_seed(0)
    predictor = Predictor(48, dim=32, depth=2, heads=2, previous_slot=previous_slot).eval()
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    k = keep.shape[1] // GRID[0]
    context = torch.randn(2, keep.shape[1], 48)
    base = predictor(context, keep, GRID)  # (B, (T-1)*S, 48): slots 1..T-1
    assert base.shape == (2, 3 * S, 48)
    for t in range(1, GRID[0]):
        changed = context.clone()
        changed[:, t * k:] = torch.randn_like(changed[:, t * k:])  # context slots >= t
        out = predictor(changed, keep, GRID)
        assert torch.allclose(slot(out, t - 1), slot(base, t - 1), atol=1e-5)  # z of slot t
        allowed = context.clone()
        allowed[:, (t - 1) * k:t * k] += torch.randn_like(allowed[:, (t - 1) * k:t * k])  # slot t-1 is visible to slot t
        assert not torch.allclose(slot(predictor(allowed, keep, GRID), t - 1), slot(base, t - 1), atol=1e-3)
    predictor.attn_impl = 'dense'
    assert torch.allclose(predictor(context, keep, GRID), base, atol=1e-5)


def test_previous_slot_starts_each_target_from_its_position_one_slot_earlier():
    torch.manual_seed(0)
    predictor = Predictor(48, dim=32, depth=1, heads=2, previous_slot=True)
    torch.nn.init.zeros_(predictor.out.weight)  # the predictor's own term is zero: z is the skip alone
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, keep.shape[1], 48)
    z = predictor(context, keep, GRID)  # (B, 3 * S, 48)
    for b in range(2):
        kept = {n: context[b, i] for i, n in enumerate(keep[b].tolist())}
        for n in range(S, 4 * S):  # target token n, the same position one slot earlier is n - S
            expected = kept.get(n - S, torch.zeros(48))
            assert torch.allclose(z[b, n - S], expected + predictor.out.bias, atol=1e-6), (b, n)


def test_previous_slot_copy_passes_no_gradient_into_the_context():
    torch.manual_seed(0)
    predictor = Predictor(48, dim=32, depth=1, heads=2, previous_slot=True)
    torch.nn.init.zeros_(predictor.out.weight)  # the predictor's own term is zero: only the copy path reaches z
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, keep.shape[1], 48, requires_grad=True)
    predictor(context, keep, GRID).square().sum().backward()
    assert torch.equal(context.grad, torch.zeros_like(context))  # the copy adds c_{t-1} but trains nothing
    torch.nn.init.normal_(predictor.out.weight)
    context.grad = None
    predictor(context, keep, GRID).square().sum().backward()
    assert context.grad.abs().sum() > 0  # the predictor's change still trains the encoder


def test_predictor_never_writes_to_the_context():
    torch.manual_seed(0)
    predictor = Predictor(48, dim=32, depth=3, heads=2)
    context = torch.randn(2, 4 * S, 48)
    seen = []
    for block in predictor.blocks:
        block.attn.kv.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    snapshot = context.clone()
    predictor(context, None, GRID)
    assert torch.equal(context, snapshot)
    # every block's keys and values come from the same projected context: never from the queries
    # (no self-attention) and never from an updated context (context isolation)
    assert len(seen) == 3 and all(s is seen[0] for s in seen)


def test_decoder_is_frame_isolated():
    torch.manual_seed(0)
    decoder = Decoder(48, 12, dim=32, depth=2, heads=2).eval()
    for block in decoder.blocks:  # leave adaLN-Zero's start so the blocks do something
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    torch.nn.init.normal_(decoder.out.weight, std=0.1)
    grid = (3, 4, 4)
    x, z, tau = torch.randn(2, 3 * S, 12), torch.randn(2, 3 * S, 48), torch.rand(2, 3)
    base = decoder(x, z, tau, grid)
    for t in range(3):
        for name in ('x', 'z', 'tau'):
            inputs = {'x': x.clone(), 'z': z.clone(), 'tau': tau.clone()}
            if name == 'tau':
                inputs['tau'][:, t] = 1 - inputs['tau'][:, t]
            else:
                inputs[name][:, t * S:(t + 1) * S] += 1.0
            out = decoder(inputs['x'], inputs['z'], inputs['tau'], grid)
            for other in range(3):
                same = torch.allclose(slot(out, other), slot(base, other), atol=1e-5)
                assert same == (other != t), (name, t, other)
    decoder.attn_impl = 'dense'
    assert torch.allclose(decoder(x, z, tau, grid), base, atol=1e-5)


def test_decoder_starts_at_zero_velocity():
    decoder = Decoder(48, 12, dim=32, depth=2, heads=2)
    out = decoder(torch.randn(2, 2 * S, 12), torch.randn(2, 2 * S, 48), torch.rand(2, 2), (2, 4, 4))
    assert torch.equal(out, torch.zeros_like(out))


def test_rope_scores_depend_only_on_relative_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 10, 24), torch.randn(1, 2, 10, 24)
    pos = positions((2, 5, 1))
    shift = torch.tensor([3.0, -7.0, 11.0])
    scores = rope(q, pos) @ rope(k, pos).transpose(-1, -2)
    shifted = rope(q, pos + shift) @ rope(k, pos + shift).transpose(-1, -2)
    assert torch.allclose(scores, shifted, atol=1e-4)
    assert not torch.allclose(scores, q @ k.transpose(-1, -2), atol=1e-2)  # positions do matter


def test_patchify_roundtrip():
    video = clip()
    tokens = patchify(video, 8)
    assert tokens.shape == (2, 64, 2 * 8 * 8 * 3)
    assert torch.equal(unpatchify(tokens, GRID, 8), video)


def test_euler_recovers_target_under_exact_velocity():
    target = torch.randn(3, 5, 7)
    exact = lambda x, tau: (target - x) / (1 - tau)  # straight path from x to the target
    assert torch.allclose(euler(exact, torch.randn(3, 5, 7), steps=10), target, atol=1e-5)


def test_gradients_from_both_losses_reach_the_encoder():
    encoder = tiny_encoder().train()
    predictor = Predictor(48, dim=32, depth=1, heads=2)
    decoder = Decoder(48, 384, dim=32, depth=1, heads=2)
    torch.nn.init.normal_(decoder.out.weight, std=0.1)  # let the flow loss reach back
    for block in decoder.blocks:
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    video = clip()
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    z = predictor(encoder(video, keep), keep, GRID)
    target = patchify(video, 8)[:, S:]
    losses = {'align': F.mse_loss(z, torch.randn_like(z)),
              'flow': F.mse_loss(decoder(torch.randn_like(target), z, torch.rand(2, 3), (3, 4, 4)), target)}
    for name, loss in losses.items():
        encoder.zero_grad()
        loss.backward(retain_graph=True)
        grad = encoder.embed.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_the_same_gradients():
    encoder = tiny_encoder().train()
    predictor = Predictor(48, dim=32, depth=1, heads=2)
    decoder = Decoder(48, 384, dim=32, depth=2, heads=2)
    torch.nn.init.normal_(decoder.out.weight, std=0.1)
    for block in decoder.blocks:
        torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
    video = clip()
    keep = sample_keep(2, GRID, 2, 0.3, generator=torch.Generator().manual_seed(0))
    noise, tau = torch.randn(2, 48, 384), torch.rand(2, 3)
    modules = (encoder, predictor, decoder)
    calls = []  # forward calls of the first encoder and decoder blocks (hooks do not see recomputation)
    for name, block in [('encoder', encoder.blocks[0]), ('decoder', decoder.blocks[0])]:
        block.forward = lambda *args, name=name, forward=block.forward: (calls.append(name), forward(*args))[1]
    grads = []
    for recompute in (False, True):
        encoder.grad_checkpointing = decoder.grad_checkpointing = recompute
        calls.clear()
        z = predictor(encoder(video, keep), keep, GRID)
        loss = decoder(noise, z, tau, (3, 4, 4)).square().mean() + z.square().mean()
        grads.append(torch.autograd.grad(loss, [p for m in modules for p in m.parameters()]))
        assert calls.count('encoder') == calls.count('decoder') == 1 + recompute  # recomputed in backward
    for plain, recomputed in zip(*grads):
        assert torch.allclose(plain, recomputed, atol=1e-6)
