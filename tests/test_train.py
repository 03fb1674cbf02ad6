"""train.py: the schedule, exact resume, checkpoints of raw modules, NaN handling, torchrun with gloo."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import train
from nextvid import RECIPE, phases, schedule
from test_data import write_video
from train import get_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a tiny run: 4 frames of 48 x 48 (2 slots of 6 x 6 tokens), 2 micro-batches per step
SMALL = ['--frames', '4', '--cooldown_frames', '8', '--resolution', '48', '--batch_size', '4',
         '--micro_batch_size', '2', '--log_every', '1', '--tau_repeats', '2', '--eval_steps', '2', '--dtype', 'fp32']

SMALL_KEYS = {'frames', 'cooldown_frames', 'resolution', 'batch_size', 'micro_batch_size', 'tau_repeats', 'steps'}


def losses(out_dir):
    rows = [json.loads(line) for line in open(os.path.join(out_dir, 'log.jsonl'))]
    return {r['step']: (r['loss'], r['flow'], r['align']) for r in rows if 'loss' in r}


def test_schedule_follows_table_8():
    args, _ = get_args(['--size', 'l'])
    assert args.steps == 132000 and args.batch_size == 3072 and args.ema == 0.99925
    at = lambda step: schedule(step, args)
    assert at(0)['stage'] == 'warmup' and at(0)['lr'] == pytest.approx(1e-4) and at(0)['tau_repeats'] == 4
    assert at(12000)['stage'] == 'stable1' and at(12000)['lr'] == pytest.approx(5e-4)
    assert at(40000)['stage'] == 'stable2' and at(40000)['lr'] == pytest.approx(4.5e-4)
    assert at(40000)['decoder_lr'] == pytest.approx(8e-4) and at(40000)['tau_repeats'] == 1
    assert at(120000)['stage'] == 'cooldown' and at(120000)['lr'] == pytest.approx(1e-4)
    assert at(120000)['decoder_lr'] == pytest.approx(3e-4)
    assert phases(args, world=8) == [(0, 120000, 16, 3072, 16), (120000, 132000, 64, 768, 4)]  # longer clips
    assert at(131999)['lr'] == pytest.approx(1e-6, rel=0.01)
    assert at(20000)['decoder_lr'] == at(20000)['lr']  # same as the main lr in stable 1


def test_every_big_size_uses_the_papers_recipe():
    for size in ('l', 'h', 'g'):
        recipe = RECIPE[size]
        assert (recipe['lr'], recipe['decoder_lr'], recipe['tau_repeats'], recipe['frames'], recipe['cooldown_frames'],
                recipe['resolution'], recipe['masks'], recipe['predictor_depth']) == (5e-4, 8e-4, 4, 16, 64, 256, '8x0.15,2x0.7', 12)
        args = get_args(['--size', size])[0]
        assert (args.predictor, args.predictor_depth) == (dict(dim=384, heads=12), 12)  # Table 7's predictor
        assert not recipe['recolour_targets']  # not in the paper


def test_recolour_permutes_and_negates_the_channels_of_each_clip():
    video = torch.rand(64, 3, 2, 4, 4) * 2 - 1
    drawn = set()
    for clip, new in zip(video, train.recolour(video)):
        # each new channel is one old channel, maybe negated, and together they use all three
        source = [next((c, s) for c in range(3) for s in (1, -1) if torch.equal(new[k], s * clip[c])) for k in range(3)]
        assert sorted(c for c, _ in source) == [0, 1, 2]
        drawn.add(tuple(source))
    assert len(drawn) > 20  # of 48: drawn per clip, not once per batch


def test_reference_reads_recoloured_clips_only_when_asked(tmp_path, monkeypatch):
    calls, real = [], train.recolour
    monkeypatch.setattr(train, 'recolour', lambda video, rngs: calls.append(len(video)) or real(video, rngs))
    train.train(SMALL + ['--steps', '2', '--recolour_targets', '--out_dir', str(tmp_path / 'on')])
    assert calls
    calls.clear()
    train.train(SMALL + ['--steps', '2', '--out_dir', str(tmp_path / 'off')])  # the default: the paper's targets
    assert not calls


def test_synthetic_clip_flags_change_the_training_clips_only(tmp_path, monkeypatch):
    made, real = [], train.make_dataset
    monkeypatch.setattr(train, 'make_dataset', lambda *a, **k: made.append((k['train'], real(*a, **k))) or made[-1][1])
    train.train(SMALL + ['--steps', '2', '--distractors', '0', '--camera_motion', '1.5', '--out_dir', str(tmp_path)])
    fixed = [d for is_training, d in made if not is_training]
    training = [d for is_training, d in made if is_training]
    assert len(fixed) == 1 and (fixed[0].distractors, fixed[0].camera_motion) == (2, 0.0)  # the default clips: scores compare
    assert training and all((d.distractors, d.camera_motion) == (0, 1.5) for d in training)
    with pytest.raises(SystemExit):  # no synthetic clips to change
        get_args(['--data', str(tmp_path), '--distractors', '0'])


def test_micro_batch_must_divide_the_batch(tmp_path):
    with pytest.raises(SystemExit, match='micro'):
        train.train(SMALL + ['--steps', '2', '--micro_batch_size', '3', '--out_dir', str(tmp_path)])


def test_micro_batch_is_derived_when_not_given():
    args, given = get_args([])  # tiny: batch 16, micro-batch 16; the cool-down 8 clips of twice the frames
    assert [phase[3:] for phase in phases(args, 2, derive_micro=True)] == [(16, 8), (8, 4)]
    assert [phase[3:] for phase in phases(args, 1, derive_micro=True)] == [(16, 16), (8, 8)]
    with pytest.raises(ValueError, match='micro-batches of 16 on 2'):  # one the user chose is kept, and checked
        phases(args, 2, derive_micro=False)
    with pytest.raises(ValueError, match='16 clips'):  # no micro-batch splits 16 clips over 3 ranks
        phases(args, 3, derive_micro=True)


@pytest.mark.parametrize('spec, message', [('nothing_here.txt', 'nothing_here.txt'), ('synthetic:x', 'bad weight'),
                                           ('list.txt', 'missing')])
def test_bad_data_stops_before_the_models_are_built(tmp_path, monkeypatch, capsys, spec, message):
    (tmp_path / 'list.txt').write_text('a.mp4 0\nb.mp4 1\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train.NextVid, 'build', lambda *a, **k: pytest.fail('built the models before checking --data'))
    with pytest.raises(SystemExit, match=message):
        train.train(['--data', spec, '--out_dir', str(tmp_path / 'out')])


def weights(out_dir):
    checkpoint = torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=False)
    return {f'{key}.{name}': value for key in ('encoder', 'ema_encoder', 'predictor', 'decoder')
            for name, value in checkpoint[key].items()}


def test_the_same_command_continues_exactly(tmp_path):
    whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
    os.makedirs(whole)
    with open(os.path.join(whole, 'log.jsonl'), 'w') as f:  # an earlier run's log: a new run does not append to it
        f.write(json.dumps(dict(step=99, loss=1.0, flow=1.0, align=1.0)) + '\n')
    train.train(SMALL + ['--steps', '12', '--out_dir', whole])
    train.train(SMALL + ['--steps', '12', '--stop_at', '6', '--out_dir', split])
    assert torch.load(os.path.join(split, 'ckpt.pt'), weights_only=False)['step'] == 6
    with pytest.raises(SystemExit, match='keeps its recipe'):
        train.train(['--resume', '--lr', '1e-3', '--out_dir', split])
    train.train(SMALL + ['--steps', '12', '--out_dir', split])  # no --resume: a requeued job's command
    expected, resumed = losses(whole), losses(split)
    assert sorted(expected) == sorted(resumed) == list(range(1, 13))
    assert expected == resumed  # the same floats, including the cool-down's longer clips (step 12)
    a, b = weights(whole), weights(split)
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert os.path.exists(os.path.join(whole, 'loss.png'))


def test_a_second_launch_never_loses_a_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    with pytest.raises(SystemExit, match='no checkpoint'):
        train.train(SMALL + ['--steps', '4', '--resume', '--out_dir', out])
    train.train(SMALL + ['--steps', '4', '--out_dir', out])
    files = {name: open(os.path.join(out, name), 'rb').read() for name in ('ckpt.pt', 'encoder.pt', 'log.jsonl')}
    train.train(SMALL + ['--steps', '4', '--out_dir', out])  # finished: nothing to do, nothing rewritten
    assert 'nothing to do' in capsys.readouterr().out
    for flags in (['--steps', '8'], ['--steps', '4', '--lr', '1e-3'], ['--steps', '4', '--size', 's']):
        with pytest.raises(SystemExit, match='another --out_dir'):  # another recipe into the same folder
            train.train(SMALL + flags + ['--out_dir', out])
    assert files == {name: open(os.path.join(out, name), 'rb').read() for name in files}


def test_continuing_with_another_micro_batch_reaches_the_same_weights(tmp_path):
    whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
    train.train(SMALL + ['--steps', '8', '--out_dir', whole])  # micro-batch 2: 2 accumulation steps
    train.train(SMALL + ['--steps', '8', '--stop_at', '4', '--out_dir', split])
    # runtime flags may change on the way: one micro-batch of 4 clips, encoder and decoder recomputed
    train.train(SMALL + ['--steps', '8', '--micro_batch_size', '4', '--grad_checkpointing', '--out_dir', split])
    config = json.load(open(os.path.join(split, 'config.json')))
    assert config['micro_batch_size'] == 4 and config['grad_checkpointing'] and config['phases'][0]['micro_batch'] == 4
    a, b = weights(whole), weights(split)
    assert all(torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6) for name in a)
    assert not all(torch.equal(a[name], b[name]) for name in a)  # (summed in another order: equal within float error)


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_', 'SLURM_'))}
    return dict(env, OMP_NUM_THREADS='1', **extra)


def test_sigterm_saves_and_the_same_command_continues_exactly(tmp_path):
    cmd = [sys.executable, 'train.py', *SMALL, '--steps', '10']
    whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
    assert subprocess.run(cmd + ['--out_dir', whole], cwd=ROOT, env=clean_env(), capture_output=True, timeout=300).returncode == 0
    job = subprocess.Popen(cmd + ['--out_dir', split], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    log = os.path.join(split, 'log.jsonl')
    deadline = time.time() + 240
    while not (os.path.exists(log) and '"step": 2, "stage"' in open(log).read()) and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # as SLURM or Kubernetes before they stop a job
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 143, output[-2000:]
    stopped = torch.load(os.path.join(split, 'ckpt.pt'), weights_only=False)['step']
    assert 2 <= stopped < 10 and f'stopped by a signal at step {stopped}' in output
    requeued = subprocess.run(cmd + ['--out_dir', split], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-2000:] + requeued.stderr[-2000:]
    assert sorted(losses(split)) == list(range(1, 11))
    a, b = weights(whole), weights(split)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_srun_tasks_train_as_one_run(tmp_path):
    flags = [*SMALL, '--steps', '3', '--micro_batch_size', '1']
    train.train(flags + ['--out_dir', str(tmp_path / 'one')])
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    tasks = [subprocess.Popen([sys.executable, 'train.py', *flags, '--out_dir', str(tmp_path / 'two')], cwd=ROOT,
                              env=clean_env(SLURM_PROCID=str(k), SLURM_LOCALID=str(k), SLURM_NTASKS='2', SLURM_NNODES='1',
                                            SLURM_JOB_ID='1', MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outputs = [task.communicate(timeout=300)[0] for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert json.load(open(tmp_path / 'two' / 'config.json'))['world'] == 2 and '2 rank(s)' in outputs[0]
    assert sorted(losses(str(tmp_path / 'two'))) == [1, 2, 3]  # one log, one line a step
    a, b = weights(str(tmp_path / 'one')), weights(str(tmp_path / 'two'))  # each clip's draws are its own
    assert all(torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6) for name in a)


def test_csv_and_bare_path_lists_train(tmp_path):
    for k in range(2):
        write_video(tmp_path / f'v{k}.mp4', 24)
    (tmp_path / 'train.csv').write_text('v0.mp4 0\nv1.mp4 1\n')  # V-JEPA 2's "path label" lines
    (tmp_path / 'bare.txt').write_text(f'v0.mp4\n{tmp_path / "v1.mp4"}\n')  # unlabelled
    out = str(tmp_path / 'out')
    train.train(SMALL + ['--steps', '2', '--data', str(tmp_path / 'train.csv'), '--val', str(tmp_path / 'bare.txt'),
                         '--fps', '1', '--keep_every', '1', '--out_dir', out])
    config = json.load(open(os.path.join(out, 'config.json')))
    for key in RECIPE['tiny'].keys() - SMALL_KEYS - {'fps'}:  # every value the size's recipe resolved
        assert config[key] == RECIPE['tiny'][key], key
    assert (config['resolution'], config['fps'], config['world']) == (48, 1.0, 1)
    assert sorted(losses(out)) == [1, 2]
    assert sorted(os.listdir(out)) == ['ckpt.pt', 'config.json', 'encoder.pt', 'encoder_0000001.pt', 'encoder_0000002.pt',
                                       'log.jsonl', 'loss.png']
    rows = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert all(0 <= r['data_wait'] <= 1 and r['short_clips'] == 1.0 for r in rows if 'loss' in r)  # 4 frames at 1 fps span 37 of 12 fps
    assert all(r['eval_clips'] == f"32 clips of {tmp_path / 'bare.txt'}" for r in rows if 'effective_rank' in r)
    train.train(SMALL + ['--steps', '4', '--data', str(tmp_path / 'bare.txt'), '--fps', '2', '--out_dir', str(tmp_path / 'b')])
    assert sorted(losses(str(tmp_path / 'b'))) == [1, 2, 3, 4]


def test_loss_goes_down(tmp_path):
    # the proof run's lr: tiny's default 2.5e-5 keeps the encoder nearly still; 1e-3 is unstable at batch 4
    train.train(SMALL + ['--steps', '30', '--lr', '1e-4', '--predictor_lr_scale', '8', '--out_dir', str(tmp_path)])
    curve = [loss for loss, _, _ in losses(str(tmp_path)).values()]
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    # every save scores next-frame generation on the fixed batch, next to the two baselines
    scores = [r for r in map(json.loads, open(tmp_path / 'log.jsonl')) if 'psnr_generated' in r]
    assert [r['step'] for r in scores] == [0, 30]
    for key in ('psnr_generated', 'psnr_copy', 'psnr_mean_colour'):
        assert all(5 < r[key] < 60 and 5 < r[key + '_masked'] < 60 for r in scores), key
    assert scores[0]['psnr_copy'] == scores[1]['psnr_copy']  # the same clips, mask and noise at every save
    assert scores[1]['psnr_generated'] != scores[0]['psnr_generated']


def test_non_finite_loss_skips_then_stops(tmp_path, monkeypatch):
    def broken(self, video, target, keeps, tau_repeats, seeds):
        nan = self.decoder.out.bias.sum() * float('nan')
        return nan, nan
    monkeypatch.setattr(train.NextVid, 'forward', broken)
    with pytest.warns(UserWarning, match='non-finite'), pytest.raises(RuntimeError, match='3 non-finite steps'):
        train.train(SMALL + ['--steps', '10', '--out_dir', str(tmp_path)])


def test_torchrun_two_ranks_on_cpu(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',  # the
           '--frames', '4', '--cooldown_frames', '8', '--resolution', '48', '--steps', '3', '--eval_steps', '2', '--log_every', '1',
           '--out_dir', str(tmp_path)]
    # recipe's batch (16) and micro-batch (16, so 8 per rank, then 4 in the cool-down)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(str(tmp_path))) == [1, 2, 3]
    checkpoint = torch.load(os.path.join(str(tmp_path), 'ckpt.pt'), weights_only=False)
    assert not any(k.startswith('module.') for k in checkpoint['encoder'])  # the raw module, not DDP's wrapper
    assert checkpoint['step'] == 3 and checkpoint['args']['batch_size'] == 16


TINY_VAE = dict(ch=8, ch_mult=(1, 2), latent_channels=4, attn_resolutions=(), resolution=48)  # factor 2


def write_vae(directory, **config):
    """A random tiny VAE file carrying its own config (vae.load_vae's convention) and its latent stats."""
    from vae import VAE
    config = {**TINY_VAE, **config}
    torch.manual_seed(1)
    weights, stats = os.path.join(directory, 'vae.pt'), os.path.join(directory, 'stats.pt')
    torch.save({'config': config, **VAE(**config).state_dict()}, weights)
    channels = config['latent_channels']
    torch.save({'mean': torch.randn(channels) * 0.1, 'std': torch.rand(channels) + 0.5}, stats)
    return weights, stats


def test_vae_target_trains_and_resumes(tmp_path):
    weights, stats = write_vae(str(tmp_path))
    out = str(tmp_path / 'run')
    flags = SMALL + ['--target', 'vae', '--vae', weights, '--vae_stats', stats, '--steps', '3', '--out_dir', out]
    train.train(flags + ['--stop_at', '2'])
    checkpoint = torch.load(os.path.join(out, 'ckpt.pt'), weights_only=False)
    assert (checkpoint['args']['target'], checkpoint['args']['vae'], checkpoint['args']['vae_stats']) == ('vae', weights, stats)
    assert checkpoint['decoder']['out.weight'].shape[0] == 2 * 4 * 4 * 4  # tubelet x (8 / 2)^2 latent pixels x 4 channels
    assert not any(key.startswith(('vae', 'encoder.down')) for key in checkpoint['encoder'])  # no VAE in the checkpoint
    train.train(['--resume', '--out_dir', out, '--log_every', '1', '--micro_batch_size', '2', '--dtype', 'fp32'])  # the recorded target and VAE files
    assert sorted(losses(out)) == [1, 2, 3]
    scores = [r for r in map(json.loads, open(os.path.join(out, 'log.jsonl'))) if 'psnr_generated' in r]
    assert [r['step'] for r in scores] == [0, 2, 3] and all(5 < r['psnr_generated'] < 60 for r in scores)


def test_vae_target_checks_its_files_and_patch_before_building(tmp_path, monkeypatch):
    weights, stats = write_vae(str(tmp_path))
    monkeypatch.setattr(train.NextVid, 'build', lambda *a, **k: pytest.fail('built the models before checking the VAE'))
    base = SMALL + ['--target', 'vae', '--steps', '2', '--out_dir', str(tmp_path / 'out')]
    with pytest.raises(SystemExit, match='nowhere.pt'):
        train.train(base + ['--vae', str(tmp_path / 'nowhere.pt'), '--vae_stats', stats])
    with pytest.raises(SystemExit, match='--vae_stats'):
        train.train(base + ['--vae', weights])
    coarse = tmp_path / 'coarse'
    coarse.mkdir()
    weights, stats = write_vae(str(coarse), ch_mult=(1, 1, 1, 1, 1))  # factor 16 > the tiny ViT's patch 8
    with pytest.raises(SystemExit, match='not a multiple'):
        train.train(base + ['--vae', weights, '--vae_stats', stats])


def test_the_defaults_per_size_are_what_the_readme_says():
    readme = open(os.path.join(ROOT, 'README.md')).read()
    table = readme[readme.index('| size | micro-batch per GPU (cool-down) | gradient checkpointing |'):].split('\n\n')[0]
    rows = [line.strip('|').split('|') for line in table.splitlines()[2:]]
    assert [row[0].strip() for row in rows] == list(RECIPE)
    for size, micro, checkpointing in rows:
        args = get_args(['--size', size.strip()])[0]
        cooldown = phases(args, world=1, derive_micro=False)[1][4]
        assert micro.strip() == f'{args.micro_batch_size} ({cooldown})', size
        assert checkpointing.strip() == ('on' if args.grad_checkpointing else 'off'), size
