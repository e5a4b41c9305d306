"""Benchmark JSONs name what produced them: library versions and intra-op threads beside pytest-benchmark's
machine_info (CPU, Python), so results/*.json are comparable without the run's shell history."""
import os


def pytest_benchmark_update_machine_info(config, machine_info):
    import diffusers
    import torch
    import transformers

    machine_info["libraries"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                 "transformers": transformers.__version__}
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    machine_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
