"""
How the scripts run: the launcher (torchrun or SLURM's srun), stopping on a signal, and precision.

    torchrun --standalone --nproc_per_node=8 train.py ...     # rank, world, local rank from torchrun
    srun python train.py ...                                   # the same, from SLURM_PROCID / SLURM_NTASKS /
                                                               # SLURM_LOCALID; rendezvous at MASTER_ADDR:MASTER_PORT
    python -c "from runtime import default_dtype; print(default_dtype('cpu'))"

train.py and probe.py call setup_distributed() first and stop together through StopSignal.
"""
import os
import signal
from contextlib import nullcontext

import torch
import torch.distributed as dist


def launcher():
    """(rank, world, local rank) from torchrun's variables, else from SLURM's (srun sets them per task),
    else (0, 1, 0). Under srun the rendezvous is MASTER_ADDR:MASTER_PORT: on one node they default to
    127.0.0.1 and a port derived from the job id; across nodes MASTER_ADDR must be set (the first node)."""
    if 'RANK' in os.environ:
        return int(os.environ['RANK']), int(os.environ['WORLD_SIZE']), int(os.environ['LOCAL_RANK'])
    if 'SLURM_PROCID' in os.environ and int(os.environ.get('SLURM_NTASKS', 1)) > 1:
        if 'MASTER_ADDR' not in os.environ:
            if int(os.environ.get('SLURM_NNODES', 1)) > 1:
                raise SystemExit('srun over several nodes: export MASTER_ADDR (the first node, e.g. '
                                 '$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) before srun')
            os.environ['MASTER_ADDR'] = '127.0.0.1'
        os.environ.setdefault('MASTER_PORT', str(20000 + int(os.environ.get('SLURM_JOB_ID', 0)) % 20000))
        return int(os.environ['SLURM_PROCID']), int(os.environ['SLURM_NTASKS']), int(os.environ.get('SLURM_LOCALID', 0))
    return 0, 1, 0


def setup_distributed(device):
    """Join the process group of the launcher's ranks (nccl on CUDA, gloo on CPU). Returns (rank,
    world, device): on CUDA each rank takes the GPU of its local rank."""
    rank, world, local = launcher()
    if world == 1:
        return 0, 1, device
    if device.startswith('cuda'):
        device = f'cuda:{local}'
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', init_method='env://',
                            rank=rank, world_size=world)
    return rank, world, device


class StopSignal:
    """SIGTERM (what SLURM and Kubernetes send before they stop or preempt a job) and SIGINT only set a
    flag; the loop asks `requested()` after each step, and every rank gets the same answer (the flags
    are all-reduced: a signal reaches the ranks at different moments, and a rank that left early would
    hang the others in the next all-reduce). A second SIGINT interrupts at once."""

    def __init__(self, world):
        self.world, self.received = world, None
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self.handle)

    def handle(self, number, frame):
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = number

    def requested(self, device):
        flag = torch.tensor([float(self.received is not None)], device=device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL if number == signal.SIGTERM else signal.default_int_handler)


def native_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): matmuls 2.2x fp32 on the 2-core
    AMD EPYC of the README; elsewhere bf16 is emulated and slower."""
    capabilities = getattr(torch.cpu, 'get_capabilities', dict)()
    return bool(capabilities.get('avx512_bf16') or capabilities.get('amx_bf16'))


def default_dtype(device):
    """bf16 autocast on GPUs and on CPUs with native bf16, fp32 elsewhere."""
    return 'bf16' if str(device).startswith('cuda') or native_bf16() else 'fp32'


def autocast(device, dtype):
    """The autocast context of --dtype ('bf16' or 'fp32') on `device`."""
    return torch.autocast(torch.device(device).type, torch.bfloat16) if dtype == 'bf16' else nullcontext()
