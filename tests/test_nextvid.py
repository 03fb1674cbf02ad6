"""The decoder's x-parameterisation, flow times, and the next-frame PSNR with its baselines."""
import math

import pytest
import torch

from decoder import Decoder, patchify
from encoder import Encoder
from masks import sample_keep
from nextvid import NextVid, next_frame_scores, sample_tau

GRID = (3, 2, 2)  # three slots of a 2 x 2 token grid
L = 3 * 4


def x_decoder(exact_x=None):
    """An x-predicting decoder whose network, when exact_x is given, returns exactly that clean target."""
    torch.manual_seed(0)
    decoder = Decoder(16, 12, dim=32, depth=1, heads=2, prediction='x')
    if exact_x is not None:
        decoder.network = lambda x_tau, z, tau, grid: exact_x
    return decoder


def test_exact_x_estimate_gives_the_exact_velocity():
    x0, x1, z = torch.randn(2, L, 12), torch.randn(2, L, 12), torch.randn(2, L, 16)
    tau = torch.tensor([[0.0, 0.5, 0.9], [0.2, 0.7, 0.95]])  # 1 - tau >= 0.05: the clamp is not reached
    tau_token = tau.repeat_interleave(4, dim=1)[..., None]  # (2, L, 1)
    x_tau = (1 - tau_token) * x0 + tau_token * x1
    velocity = x_decoder(exact_x=x1)(x_tau, z, tau, GRID)
    assert torch.allclose(velocity, x1 - x0, atol=1e-5)
    assert torch.allclose(velocity, x_decoder().flow_target(x0, x1, tau_token), atol=1e-5)  # what the loss regresses


def test_the_clamp_keeps_the_velocity_finite_at_tau_1():
    x0, x1, z = torch.randn(2, L, 12), torch.randn(2, L, 12), torch.randn(2, L, 16)
    tau = torch.ones(2, 3)
    velocity = x_decoder()(x1, z, tau, GRID)  # x_tau = x1 at tau = 1
    target = x_decoder().flow_target(x0, x1, torch.ones(2, L, 1))
    assert torch.isfinite(velocity).all() and torch.isfinite(target).all()
    assert torch.equal(target, torch.zeros_like(target))  # the path has arrived: nothing left to move
    assert velocity.abs().max() > 0  # an untrained x_hat (0) is off the target, and the velocity says so


@pytest.mark.parametrize('steps', [10, 50, 200])  # 50 and 200 end past the training clamp's 1 - tau = 0.05
def test_euler_with_an_exact_x_predictor_recovers_the_target(steps):
    target = torch.randn(2, L, 12)
    generated = x_decoder(exact_x=target).sample(torch.randn(2, L, 16), GRID, steps=steps, generator=torch.Generator())
    assert torch.allclose(generated, target, atol=1e-5)


def test_v_prediction_is_the_network_output_itself():
    decoder = Decoder(16, 12, dim=32, depth=1, heads=2, prediction='v')
    out = torch.randn(2, L, 12)
    decoder.network = lambda x_tau, z, tau, grid: out
    assert torch.equal(decoder(torch.randn(2, L, 12), torch.randn(2, L, 16), torch.rand(2, 3), GRID), out)
    with pytest.raises(ValueError, match='prediction'):
        Decoder(16, 12, prediction='eps')


def test_logit_normal_tau_follows_jit():
    draws = torch.rand(200000)
    tau = sample_tau(draws, 'logit_normal')
    logit = torch.log(tau / (1 - tau))
    assert abs(logit.mean() + 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
    assert (tau < 0.5).float().mean() > 0.8  # most draws nearer the noise
    assert (tau[draws.argsort()].diff() >= 0).all()  # monotone in the uniform draw
    uniform = sample_tau(draws, 'uniform')
    assert abs(uniform.mean() - 0.5) < 0.01 and uniform.min() >= 0 and uniform.max() < 1


def test_objective_has_no_flow_loss_for_an_exact_x_predictor():
    torch.manual_seed(0)
    model = NextVid.build('tiny', dict(dim=32, heads=2), 1, dict(dim=32, depth=1, heads=2), 'x', 'uniform',
                          encoder_config=dict(dim=32, depth=1, heads=2, patch=8))
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1  # 2 slots of 2 x 2 tokens
    x1 = patchify(video, 8)[:, 4:]  # slot 1, the decoder's target
    for offset, zero in [(0.0, True), (0.1, False)]:
        model.decoder.network = lambda x_tau, z, tau, grid: x1.repeat(2, 1, 1) + offset  # 2 repeats
        flow, _ = model(video, torch.randn(2, 8, 32), [None], tau_repeats=2)
        assert (flow.item() < 1e-10) == zero, flow


@pytest.mark.parametrize('share', [0.0, 1.0])
def test_a_decoder_input_reads_either_z_or_the_reference_features(share):
    torch.manual_seed(0)
    model = NextVid.build('tiny', dict(dim=32, heads=2), 1, dict(dim=32, depth=1, heads=2), 'x', 'uniform',
                          encoder_config=dict(dim=32, depth=1, heads=2, patch=8), reference_condition=share)
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1  # 2 slots of 2 x 2 tokens
    target = torch.randn(2, 8, 32)  # the reference features c' of both slots
    conditions = []
    model.decoder.network = lambda x_tau, z, tau, grid: (conditions.append(z), x_tau)[1]
    model(video, target, [None], tau_repeats=1)
    z = model.predictor(model.encoder(video, None), None, (2, 2, 2))
    expected = target[:, 4:] if share == 1.0 else z  # share 1: every input reads c'_1; 0: the predictor's z_1
    assert torch.allclose(conditions[0], expected, atol=1e-6)


def hand_made_clip():
    """Two slots (4 frames) of 16 x 16 pixels, 2 x 2 tokens of patch 8. Every pixel of token p of slot t
    has value v[t][p] + 0.1 * channel."""
    v = [[0.2, 0.4, -0.6, 0.8], [0.3, 0.4, 0.0, 1.0]]
    video = torch.zeros(1, 3, 4, 16, 16)
    for t in range(2):
        for p in range(4):
            y, x = divmod(p, 2)
            for c in range(3):
                video[0, c, 2 * t:2 * t + 2, 8 * y:8 * y + 8, 8 * x:8 * x + 8] = v[t][p] + 0.1 * c
    return video, v


def test_psnr_and_both_baselines_on_a_hand_made_clip():
    video, v = hand_made_clip()
    encoder = Encoder(dim=48, depth=1, heads=2, patch=8)  # only its patch and tubelet are used here
    keep = torch.tensor([[0, 1, 4, 5]])  # positions 0 and 1 seen in both slots; 2 and 3 masked
    generated = patchify(video, 8)[:, 4:] + 0.1  # slot 1, off by 0.1 everywhere
    scores = next_frame_scores(encoder, None, None, video, keep, steps=1, generator=None, generated=generated)
    db = lambda errors: 10 * math.log10(4 / (sum(errors) / len(errors)))
    assert scores['generated'] == pytest.approx((db([0.01]), db([0.01])))
    # copy: slot 0 where seen, the mean of slot 0's seen pixels (0.3 + 0.1 c) where masked
    copy = [(v[0][0] - v[1][0]) ** 2, (v[0][1] - v[1][1]) ** 2, (0.3 - v[1][2]) ** 2, (0.3 - v[1][3]) ** 2]
    assert scores['copy'] == pytest.approx((db(copy), db(copy[2:])))
    mean = sum(v[0] + v[1]) / 8  # each channel's mean over the clip
    flat = [(mean - value) ** 2 for value in v[1]]
    assert scores['mean colour'] == pytest.approx((db(flat), db(flat[2:])))
    unmasked = next_frame_scores(encoder, None, None, video, None, steps=1, generator=None, generated=generated)
    assert unmasked['copy'] == (pytest.approx(db([(a - b) ** 2 for a, b in zip(*v)])), None)


def test_vae_targets_are_the_latent_tokens_of_the_clip():
    from nextvid import target_frames
    from vae import VAE, latent_tokens
    torch.manual_seed(0)
    vae = VAE(ch=8, ch_mult=(1, 2), latent_channels=4, attn_resolutions=(), resolution=16).eval().requires_grad_(False)
    build = lambda **target: NextVid.build('tiny', dict(dim=32, heads=2), 1, dict(dim=32, depth=1, heads=2), 'x', 'uniform',
                                           encoder_config=dict(dim=32, depth=1, heads=2, patch=8), **target)
    model = build(target='vae', vae=vae)
    assert model.decoder.out.out_features == 2 * 4 * 4 * 4  # tubelet x (8 / factor 2)^2 x 4 channels
    assert build().decoder.out.out_features == 2 * 8 * 8 * 3  # pixels
    assert not any('vae' in name for name in model.state_dict()) and len(list(model.parameters())) == len(
        list(build().parameters()))  # the frozen VAE is no submodule
    video = torch.rand(2, 3, 4, 16, 16) * 2 - 1
    expected = latent_tokens(vae.encode(video, sample=False), 4)
    assert torch.equal(model.targets(video, sample=False), expected)
    assert torch.equal(model.targets(video, generator=torch.Generator().manual_seed(3)),
                       latent_tokens(vae.encode(video, generator=torch.Generator().manual_seed(3)), 4))
    assert torch.equal(build().targets(video), patchify(video, 8))
    frames = target_frames(expected, (2, 2, 2), 8, 2, vae)
    assert frames.shape == video.shape and frames.abs().max() <= 1
    with pytest.raises(ValueError, match='vae'):
        build(target='vae')
    flow, align = model(video, torch.randn(2, 8, 32), [None], tau_repeats=1)
    assert torch.isfinite(flow) and torch.isfinite(align)


def test_the_compiled_step_does_not_recompile_from_batch_to_batch():
    """train.py --compile compiles every block with static shapes; a new kept count would be a new
    sequence length and a recompile (with V-JEPA's batch minimum: 4 more graphs in 3 steps, then
    dynamo's limit and eager). Count the compilations over steps with fresh masks from two
    generators: after the first step, none."""
    torch._dynamo.reset()
    compiled = []

    def counting_backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    torch.manual_seed(0)
    model = NextVid.build('tiny', predictor=dict(dim=32, heads=2), predictor_depth=1, prediction='x',
                          decoder=dict(dim=32, depth=1, heads=2), tau_sampling='uniform',
                          encoder_config=dict(dim=32, depth=2, heads=2, patch=8))
    for block in [*model.encoder.blocks, *model.predictor.blocks, *model.decoder.blocks]:
        block.compile(backend=counting_backend, dynamic=False)  # as train.py
    video = torch.randn(2, 3, 8, 32, 32)
    grid = model.encoder.grid(video)  # (4, 4, 4)
    target = torch.randn(2, 64, 32)
    generator = torch.Generator().manual_seed(0)
    counts = []
    for _ in range(4):
        keeps = [sample_keep(2, grid, 2, 0.15, generator=generator), sample_keep(2, grid, 1, 0.5, generator=generator)]
        flow, align = model(video, target, keeps, tau_repeats=1)
        (flow + align).backward()
        counts.append(len(compiled))
    torch._dynamo.reset()
    assert counts[0] > 0 and counts[1:] == [counts[0]] * 3, counts
