"""Jobs whose work runs as several processes: a training spec's `gpus` (one process per GPU, training
one LoRA data-parallel: fluxlora.training.trainer.distributed). Torch's own launcher starts them
(`torchrun`, i.e. torch.distributed.run): it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT, hosts the rendezvous, forwards SIGTERM to every rank and, when one rank fails, stops the
others. Both the process runner and a Kubernetes Job's pod run it through fluxlora.server.launcher,
which exits with the failed rank's own code (3 for a config error, 137 for a rank the out-of-memory
killer took) where torchrun would exit 1. This module only builds the command line (the job
runtime's floor imports no torch)."""

from __future__ import annotations

from typing import Any

LAUNCHER_MODULE = "fluxlora.server.launcher"  # torchrun, exiting with its failed rank's code


def gpus_of(spec: Any) -> int:
    """The processes (GPUs) one job's work asks for: its spec's `gpus` field (TrainSpec), 1 for
    specs without one or with it unset."""
    fields = getattr(getattr(spec, "DESCRIPTOR", None), "fields_by_name", {})
    return max(1, int(spec.gpus)) if "gpus" in fields else 1


def nodes_of(spec: Any) -> int:
    """The nodes (pods of `gpus_of` processes each) one job's work asks for: a TrainSpec's `nodes`, else 1."""
    fields = getattr(getattr(spec, "DESCRIPTOR", None), "fields_by_name", {})
    return max(1, int(spec.nodes)) if "nodes" in fields else 1


def torchrun_options(processes: int, stop_grace_s: float) -> list[str]:
    """torchrun's options for `processes` ranks on this machine. --standalone: a rendezvous of its
    own on a free local port, no other party involved. --shutdown-timeout: after SIGTERM, the ranks
    get the caller's stop grace (less a margin for torchrun itself) to stop at a step boundary and
    save a checkpoint before it kills them."""
    grace = max(1, int(stop_grace_s) - 5)
    return ["--standalone", f"--nproc-per-node={processes}", f"--shutdown-timeout={grace}"]


def multi_node_options(processes: int, nodes: int, node_rank: str, master_addr: str, master_port: int,
                       stop_grace_s: float) -> list[str]:
    """torchrun's options for `processes` ranks on each of `nodes` machines, with its static rendezvous:
    this machine's `node_rank` (0 .. nodes-1) and the store that node 0's torchrun hosts at
    master_addr:master_port. The others retry connecting until node 0 is up (torch's default, 600 s)."""
    grace = max(1, int(stop_grace_s) - 5)
    return [f"--nnodes={nodes}", f"--nproc-per-node={processes}", f"--node-rank={node_rank}",
            f"--master-addr={master_addr}", f"--master-port={master_port}", f"--shutdown-timeout={grace}"]
