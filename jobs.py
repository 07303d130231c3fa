"""
Plumbing off the reader's path: progress bars that read well in a terminal and in a log file, a script's exit on
bad input or Ctrl-C in one line, the pool of worker processes the continual-learning runs go to (each run on one
thread, Ctrl-C handled once by the parent, a worker that ends by itself when its parent is gone), and data-parallel
pretraining under torchrun (torch.distributed, as nanoGPT does).
"""

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------
# progress bars that read well in a terminal and in a log file


class LogLines:
    """A file for tqdm in a log: each redraw becomes a line of its own (no carriage returns, no blank lines)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        line = text.replace("\r", "").strip("\n").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self):
        self.stream.flush()


def progress(iterable=None, **kwargs):
    """tqdm that redraws in place in a terminal, and writes a line at most every 30 s into a log file (when
    stderr is not a terminal), plus one when the bar closes."""
    if not sys.stderr.isatty():
        if hasattr(sys.stdout, "reconfigure"):  # printed lines and bar lines reach the log in order
            sys.stdout.reconfigure(line_buffering=True)
        kwargs.update(mininterval=30.0, leave=True, ascii=True, file=LogLines(sys.stderr))
    return tqdm(iterable, **kwargs)


def run_script(main, argv):
    """A script's exit status: main(argv)'s (0 if it returns None); 2 after a one-line error for bad input or a loss
    that is not finite; 130 after Ctrl-C, in one line (what was finished is cached: a rerun resumes)."""
    try:
        return main(argv) or 0
    except (ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun to resume", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------------------------------------------
# the worker pool


def start_worker(parent):
    """In a worker process (started with Ctrl-C ignored: it is its parent's to handle, in one line, and the parent
    then ends the workers), run once at its start: the worker ends by itself when its parent is gone, even after a
    kill -9 of the parent.
    Its progress bars share a thread lock, not tqdm's default inter-process lock, which a worker ended by its
    parent would leave behind (and Python would warn of a leaked semaphore at exit)."""
    tqdm.set_lock(threading.RLock())

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_all(function, items, jobs, **shared):
    """function(item, **shared) for every item: one after another in this process, or `jobs` at a time in worker
    processes, spawned (a fork is unsafe once torch has run). A worker's error, or Ctrl-C, ends every worker and is
    raised here; a worker that died (out of memory?) is one line."""
    if jobs <= 1 or len(items) <= 1:
        for item in items:
            function(item, **shared)
        return
    context = multiprocessing.get_context("spawn")
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers start with Ctrl-C ignored (an ignored
    try:  # signal stays ignored in a new process), so that it is never seen half-way through their start
        pool = ProcessPoolExecutor(min(jobs, len(items)), mp_context=context, initializer=start_worker,
                                   initargs=(os.getpid(),))
        futures = [pool.submit(function, item, **shared) for item in items]
    finally:
        signal.signal(signal.SIGINT, interrupt)
    try:
        for future in futures:
            future.result()  # a worker's error is raised here
    except BaseException as error:  # an error or Ctrl-C: no worker goes on
        for process in multiprocessing.active_children():
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(error, BrokenProcessPool):
            raise ValueError("a worker process died (out of memory?); the finished runs are saved: rerun to "
                             "resume, or use --jobs=1") from None
        raise
    pool.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# data-parallel pretraining: `torchrun --standalone --nproc_per_node=N train.py --stage=pretrain ...`


def data_parallel():
    """(rank, world size) of this process: (0, 1) when it runs alone; under torchrun (which sets RANK) the process
    group is started once, gloo on the CPU, nccl on CUDA (each rank on its own GPU, LOCAL_RANK)."""
    if "RANK" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def average_gradients(parameters, world_size):
    """g <- (1/W) sum over the W ranks of g. Each rank's loss is the mean over its equal share of the global batch,
    so the average of their gradients is the gradient of the mean over the global batch: the step one process takes
    on the whole batch (up to the order of floating-point sums)."""
    if world_size == 1:
        return
    for p in parameters:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def end_data_parallel():
    """Wait for every rank, then close the process group (after pretraining: the later stages run in one process)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
