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


def pytest_collection_modifyitems(config, items):
    """`make bench`: the SD1.5 and SDXL step suites first. Their arms run in child processes (the official ones peak
    at 16 GB and past 21 GB), and the suites after them build SD-size models in this process, which keeps their
    memory (freeing the memory suite's Trainer and trimming the heap did not bring it back): after the memory suite
    this process held 14 GB, and the official arm beside it ran a 23 GB box out of memory (measured twice)."""
    if config.getoption("benchmark_disable", False):
        return
    steps = ("test_bench_sd15_step.py", "test_bench_sdxl_step.py")
    items.sort(key=lambda item: item.path.name not in steps)  # stable: the rest keep their order
