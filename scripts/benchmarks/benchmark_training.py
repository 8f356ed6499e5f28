"""Training throughput: synthetic pairs per second, per device, dimension and architecture.

One training step as ``training.train`` does it (online synthetic pairs on the device, Eq. 1 targets,
forward, sum-of-squares loss, backward, RMSprop), timed over ``--iterations`` batches after
``--warmup`` batches. Runs on CPU, and on CUDA when torch sees a GPU. Prints a markdown table.

    python scripts/benchmarks/benchmark_training.py --groundtruth GT2D [GT3D] --sdm SDM2D.npz [SDM3D.npz]

Each ground-truth folder (``agentreg groundtruth``) and its SDM (``agentreg sdm``) give the real
subjects and deformations of one dimension; give a 2-D and a 3-D pair to benchmark both.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "AgentRegistration"))

from AgentRegistrationLib.contract.training_config import config_by_name  # noqa: E402
from AgentRegistrationLib.core.agent import Agent  # noqa: E402
from AgentRegistrationLib.core.network import DualStreamQNetwork, NetworkConfig, count_parameters  # noqa: E402
from AgentRegistrationLib.core.sdm import StatisticalDeformationModel  # noqa: E402
from AgentRegistrationLib.core.synthetic import SyntheticPairGenerator, q_targets  # noqa: E402
from AgentRegistrationLib.model.devices import device_name, synchronize  # noqa: E402
from AgentRegistrationLib.stages.training import action_steps_for  # noqa: E402
from AgentRegistrationLib.stages.training_set import TrainingSet  # noqa: E402


def device_text(device: torch.device) -> str:
    """The device as this benchmark names it: the GPU, or the CPU with torch's threads."""
    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)} ({torch.get_num_threads()} threads)"


def pairs_per_second(gt: Path, sdm_path: Path, architecture: str, device: torch.device, batch: int,
                     warmup: int, iterations: int) -> dict:
    training_set = TrainingSet.from_groundtruth(gt)
    geometry = training_set.geometry
    sdm = StatisticalDeformationModel.load(sdm_path)
    config = config_by_name(architecture)
    batch = batch or config.batch(geometry.dim)
    torch.manual_seed(0)
    network = DualStreamQNetwork(NetworkConfig(architecture, geometry.dim, tuple(geometry.size), 2 * sdm.num_modes))
    agent = Agent(network.to(device), sdm, geometry.size, action_steps_for(sdm, config), device)
    network.train()
    q_scale = float((agent.action_steps**2).mean())
    generator = SyntheticPairGenerator(
        torch.as_tensor(training_set.images, device=device)[:, None],
        torch.as_tensor(training_set.labels, device=device)[:, None], training_set.pairs,
        sdm.project(training_set.coefficients), sdm, agent.mode_fields, agent.theta_start,
        generator=torch.Generator(device=device).manual_seed(0))
    optimizer = torch.optim.RMSprop(network.parameters(), lr=config.learning_rate)

    def step() -> None:
        with torch.no_grad():
            fixed, moving, theta_gt, _ = generator.sample(batch)
            target = q_targets(theta_gt, agent.theta_start.expand(batch, -1), agent.deltas) / q_scale
        loss = ((network(fixed, moving) - target) ** 2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"dim": geometry.dim, "architecture": architecture, "device": device.type, "batch": batch,
            "parameters": count_parameters(network), "pairs_per_second": batch * iterations / seconds,
            "ms_per_batch": 1000 * seconds / iterations}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groundtruth", required=True, type=Path, nargs="+", help="GT folders (e.g. a 2-D and a 3-D one)")
    parser.add_argument("--sdm", required=True, type=Path, nargs="+", help="their SDMs (.npz), in the same order")
    parser.add_argument("--architectures", default="compact,paper")
    parser.add_argument("--devices", default="cpu,cuda", help="cuda is skipped (with a note) when absent")
    parser.add_argument("--batch", type=int, default=0, help="pairs per batch (default: the paper's 65 / 30)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.groundtruth) != len(args.sdm):
        parser.error(f"{len(args.groundtruth)} --groundtruth folders but {len(args.sdm)} --sdm files: give one SDM per folder")
    datasets = list(zip(args.groundtruth, args.sdm, strict=True))
    devices = []
    for name in args.devices.split(","):
        if name == "cuda" and not torch.cuda.is_available():
            print("note: no CUDA GPU visible to torch; CUDA rows skipped", file=sys.stderr)
            continue
        devices.append(torch.device(name))
    for device in devices:
        print(f"device {device}: {device_text(device)}", file=sys.stderr)
    rows = []
    for gt, sdm in datasets:
        for architecture in args.architectures.split(","):
            for device in devices:
                row = pairs_per_second(gt, sdm, architecture, device, args.batch, args.warmup, args.iterations)
                print(f"  {row['dim']}-D {architecture} on {device}: {row['pairs_per_second']:.1f} pairs/s", file=sys.stderr)
                rows.append(row)
    print(f"\nTraining throughput, {args.iterations} batches after {args.warmup} warm-up batches; torch {torch.__version__}; "
          + "; ".join(f"{d}: {device_text(d)}" for d in devices) + "\n")
    print("| dim | architecture | parameters | device | batch | ms / batch | pairs / s | vs CPU |")
    print("|---|---|---:|---|---:|---:|---:|---:|")
    for row in rows:
        cpu = next((r for r in rows if r["device"] == "cpu" and r["dim"] == row["dim"]
                    and r["architecture"] == row["architecture"]), None)
        ratio = f"{row['pairs_per_second'] / cpu['pairs_per_second']:.1f}x" if cpu else "-"
        print(f"| {row['dim']}-D | {row['architecture']} | {row['parameters']:,} | {row['device']} | {row['batch']} | "
              f"{row['ms_per_batch']:.1f} | {row['pairs_per_second']:.1f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
