"""Joining a multi-process run (`jax.distributed`) the way clusters launch one.

The same command runs on every host (TPU pod), as every task of `srun` (SLURM) or
`mpirun` (Open MPI), or in every pod of an indexed Job / JobSet (Kubernetes). Each
process calls `join()` before any other JAX work: where the environment says this process
is one of several, it calls `jax.distributed.initialize()`, which reads the coordinator,
process count and index from that environment; explicit `coordinator_address`,
`num_processes` and `process_id` (the scripts' flags of those names) serve any other
launch. A plain single-process run is left alone. After joining, `jax.devices()` is
global and every process builds the same mesh over it.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from collections.abc import Mapping

import jax
from absl import flags, logging


def launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The launcher that started this process as one of several (`jax.distributed`
    detects its coordinator, process count and index), or None for a lone process."""
    if "SLURM_STEP_NODELIST" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "open_mpi"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    if len(hosts) > 1 or "MEGASCALE_COORDINATOR_ADDRESS" in environ:
        return "tpu_pod"
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return "kubernetes"
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "jax_env"
    tpu_chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    if tpu_chips and importlib.util.find_spec("libtpu"):
        return "tpu_vm"  # JAX asks the TPU metadata whether this VM is one host of a pod
    return None


def join(coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, *,
         environ: Mapping[str, str] = os.environ) -> str | None:
    """Joins the multi-process run this process belongs to; returns how it was found
    ("flags" or the `launcher`), or None when it runs alone (nothing is done).

    Processes other than 0 log warnings and errors only (`jax.process_index()` tells the
    library which process writes files). CPU processes exchange collectives over gloo.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    found = launcher(environ)
    if found is None and any(v is not None for v in given.values()):
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise ValueError(f"--{', --'.join(missing)} must be given with the other "
                             "distributed flags outside a cluster launcher (SLURM, Open MPI, "
                             "TPU pod, Kubernetes)")
        found = "flags"
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: must be at least 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id}: must be in [0, --num_processes="
                         f"{num_processes})")
    if found is None:
        return None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)
    logging.info("Joined a run of %d processes (%s) with %d devices, %d here",
                 jax.process_count(), found, jax.device_count(), jax.local_device_count())
    return found


def define_flags() -> None:
    """`--coordinator_address`, `--num_processes`, `--process_id` for a script's `main`."""
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0's coordinator, for a multi-process run that "
                        "no cluster launcher (SLURM, Open MPI, TPU pod, Kubernetes) describes.")
    flags.DEFINE_integer("num_processes", None, "Processes in the multi-process run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def join_from_flags() -> str | None:
    """`join` with the flags of `define_flags`."""
    f = flags.FLAGS
    return join(f.coordinator_address, f.num_processes, f.process_id)
